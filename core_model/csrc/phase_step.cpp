// A cached forward of T new tokens per row (no padding) through one block: everything between
// its input projection and scaled_dot_product_attention, fused into one call. The eager
// reference is core_model/block.py with kuramoto.py, gating.py and attention.py. For token t of
// a row, with phases theta (F), the running sum S (F, 2) of its Kuramoto mean field and the
// count n_t of tokens the mean field covers:
//
//   u      = (cos theta, sin theta),  u_perp = (-sin theta, cos theta)
//   S     += u,  z = S / n_t,  r = mean_k |z_k|                          (prefix mean field)
//   gate   = sigmoid(logit + a (r - tau))                                (coherence gate, g / 2)
//   theta' = theta + dt (omega + K z . u_perp + ext . u_perp)            (Kuramoto step)
//   q_h    = [RoPE(q_sem_h), w_h u],  k_h = [RoPE(k_sem_h), u],  v_h     (resonant attention)
//
// with w_h = resonance_h * w_scale and u flattened as (cos_0, sin_0, cos_1, ...). k and v are
// written into the cache at positions pos..pos+T-1; the queries are returned. A projection row
// of `proj` (B, T, W) holds [q (H d_s) | k (H d_s) | v (H d) | omega (F) | gate logit], omega at omega_col and
// the logit at gate_col (-1: that part is off). Every tensor is float32 on the CPU; a None
// switches its part off (no phases at all: the vanilla block), and its output is then empty.
#include <torch/extension.h>

#include <cmath>
#include <vector>

using OptTensor = c10::optional<torch::Tensor>;

static const float* ptr_or_null(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

std::vector<torch::Tensor> block_step(torch::Tensor proj, int64_t H, int64_t d_s, int64_t d,
                                      OptTensor rope_cos_, OptTensor rope_sin_, torch::Tensor cache_k,
                                      torch::Tensor cache_v, int64_t pos, OptTensor theta_,
                                      int64_t omega_col, int64_t gate_col, OptTensor past_sum_,
                                      OptTensor count_, OptTensor ext_, OptTensor resonance_,
                                      double w_scale, OptTensor K_, double dt, OptTensor a_, double tau) {
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "block_step: the cache must be contiguous");
  TORCH_CHECK(proj.dim() >= 1 && proj.size(0) > 0, "block_step: empty batch");
  for (const OptTensor& t : {OptTensor(proj), OptTensor(cache_k), OptTensor(cache_v), rope_cos_, rope_sin_, theta_,
                             past_sum_, count_, ext_, resonance_, K_, a_})
    TORCH_CHECK(!t.has_value() || (t->device().is_cpu() && t->scalar_type() == torch::kFloat),
                "block_step: float32 CPU tensors only");
  TORCH_CHECK(omega_col < 0 || (K_.has_value() && K_->numel() == 1), "block_step: the Kuramoto step needs K");
  TORCH_CHECK(gate_col < 0 || (a_.has_value() && a_->numel() == 1), "block_step: the gate needs its weight");
  proj = proj.contiguous();
  auto opts = proj.options();
  auto none = torch::empty({0}, opts);
  auto get = [&](const OptTensor& t) { return t.has_value() ? t->contiguous() : none; };
  auto theta = get(theta_), past_sum = get(past_sum_), count = get(count_), ext = get(ext_);
  auto resonance = get(resonance_), rope_cos = get(rope_cos_), rope_sin = get(rope_sin_);
  TORCH_CHECK(proj.dim() == 3, "block_step: proj must be (B, T, W)");
  const int64_t B = proj.size(0), T = proj.size(1), W = proj.size(2), T_max = cache_k.size(2);
  const int64_t F = theta.numel() ? theta.numel() / (B * T) : 0, half = d_s / 2;
  const bool phases = F > 0, field = past_sum.numel() > 0, kuramoto = omega_col >= 0;
  const bool gated = gate_col >= 0, resonant = resonance.numel() > 0, external = ext.numel() > 0;
  const bool rope = rope_cos.numel() > 0;
  TORCH_CHECK(T > 0, "block_step: no tokens");
  TORCH_CHECK(!(kuramoto || gated) || field, "block_step: the Kuramoto step and the gate need the mean field");
  TORCH_CHECK(d_s + (resonant ? 2 * F : 0) == d, "block_step: head layout mismatch");
  // shapes: every read below stays inside its tensor
  TORCH_CHECK(W >= 2 * H * d_s + H * d, "block_step: projection narrower than q, k, v");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.size(0) == B && cache_k.size(1) == H && cache_k.size(3) == d &&
              cache_v.sizes() == cache_k.sizes() && 0 <= pos && pos + T <= T_max,
              "block_step: cache shape or position");
  TORCH_CHECK(!rope || (rope_cos.numel() == B * T * half && rope_sin.numel() == B * T * half), "block_step: rope tables");
  TORCH_CHECK(!phases || theta.numel() == B * T * F, "block_step: theta shape");
  TORCH_CHECK(!field || (past_sum.numel() == B * F * 2 && count.numel() == B * T), "block_step: mean-field state");
  TORCH_CHECK(!external || ext.numel() == B * F * 2, "block_step: external field must be (B, F, 2)");
  TORCH_CHECK(!resonant || (phases && resonance.numel() == H), "block_step: resonance weights");
  TORCH_CHECK((!kuramoto || omega_col + F <= W) && (!gated || gate_col < W), "block_step: projection columns");
  auto q = torch::empty({B, H, T, d}, opts);
  auto new_sum = field ? torch::empty({B, 1, F, 2}, opts) : none;
  auto order = field ? torch::empty({B, T, 1}, opts) : none;
  auto gate = gated ? torch::empty({B, T, 1}, opts) : none;
  auto theta_new = kuramoto ? torch::empty({B, T, F}, opts) : none;
  const float k_coupling = kuramoto ? K_->data_ptr<float>()[0] : 0.f;
  const float a_gate = gated ? a_->data_ptr<float>()[0] : 0.f;
  const float half_pi = static_cast<float>(M_PI / 2);
  const float *pr = proj.data_ptr<float>(), *th = ptr_or_null(theta), *wr = ptr_or_null(resonance);
  const float *rc = ptr_or_null(rope_cos), *rs = ptr_or_null(rope_sin);
  float *qp = q.data_ptr<float>(), *kp = cache_k.data_ptr<float>(), *vp = cache_v.data_ptr<float>();
  std::vector<float> u(2 * F), S(2 * F);
  for (int64_t b = 0; b < B; ++b) {
    if (field) {
      const float* ps = past_sum.data_ptr<float>() + b * F * 2;
      for (int64_t j = 0; j < 2 * F; ++j) S[j] = ps[j];
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t bt = b * T + t;
      const float* row = pr + bt * W;
      // --- phases: phasors, mean field, order parameter, gate, Kuramoto step
      if (phases) {
        float r = 0.f;
        const float n = field ? count.data_ptr<float>()[bt] : 1.f;
        for (int64_t k = 0; k < F; ++k) {
          const float th_k = th[bt * F + k];
          // the eager path computes cos(theta - s) for s = 0, pi/2, -pi/2
          const float c = std::cos(th_k), s = std::cos(th_k - half_pi), ms = std::cos(th_k + half_pi);
          u[2 * k] = c;
          u[2 * k + 1] = s;
          float zr = 0.f, zi = 0.f;
          if (field) {
            S[2 * k] += c;
            S[2 * k + 1] += s;
            zr = S[2 * k] / n;
            zi = S[2 * k + 1] / n;
            r += std::sqrt(zr * zr + zi * zi);
          }
          if (kuramoto) {
            float dth = row[omega_col + k] + k_coupling * (zr * ms + zi * c);  // z . u_perp
            if (external) {
              const float* e = ext.data_ptr<float>() + (b * F + k) * 2;
              dth += e[0] * ms + e[1] * c;
            }
            theta_new.data_ptr<float>()[bt * F + k] = th_k + static_cast<float>(dt) * dth;
          }
        }
        if (field) order.data_ptr<float>()[bt] = r / static_cast<float>(F);
        if (gated) {
          const float x = row[gate_col] + a_gate * (r / static_cast<float>(F) - static_cast<float>(tau));
          gate.data_ptr<float>()[bt] = 1.f / (1.f + std::exp(-x));
        }
      }
      // --- attention inputs: RoPE on the semantic q and k, phase features, k and v into the cache
      const float *cs = rope ? rc + bt * half : nullptr, *sn = rope ? rs + bt * half : nullptr;
      for (int64_t h = 0; h < 2 * H; ++h) {  // heads 0..H-1 are queries, H..2H-1 keys
        const float* x = row + h * d_s;
        float* out = h < H ? qp + ((b * H + h) * T + t) * d : kp + ((b * H + (h - H)) * T_max + pos + t) * d;
        if (rope) {
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = x[i], x2 = x[half + i];
            const float p1 = x1 * cs[i], p2 = x2 * sn[i], p3 = x1 * sn[i], p4 = x2 * cs[i];
            out[i] = p1 - p2;
            out[half + i] = p3 + p4;
          }
        } else {
          for (int64_t i = 0; i < d_s; ++i) out[i] = x[i];
        }
        if (resonant) {
          const float scale = h < H ? wr[h] * static_cast<float>(w_scale) : 1.f;
          for (int64_t j = 0; j < 2 * F; ++j) out[d_s + j] = h < H ? scale * u[j] : u[j];
        }
      }
      const float* v = row + 2 * H * d_s;
      for (int64_t h = 0; h < H; ++h) {
        float* out = vp + ((b * H + h) * T_max + pos + t) * d;
        for (int64_t i = 0; i < d; ++i) out[i] = v[h * d + i];
      }
    }
    if (field) {
      float* ns = new_sum.data_ptr<float>() + b * F * 2;
      for (int64_t j = 0; j < 2 * F; ++j) ns[j] = S[j];
    }
  }
  return {q, new_sum, order, gate, theta_new};
}

// phase_fields.cpp: the phase machinery of an uncached sequence, forward and backward
std::vector<torch::Tensor> phase_fields_fwd(torch::Tensor theta, OptTensor omega, OptTensor logit, OptTensor K,
                                            OptTensor a, double tau, double dt, OptTensor resonance,
                                            double w_scale, int64_t H, bool field);
std::vector<torch::Tensor> phase_fields_bwd(torch::Tensor theta, torch::Tensor z, torch::Tensor gate,
                                            torch::Tensor order, OptTensor g_theta, OptTensor g_gate,
                                            OptTensor g_order, OptTensor g_qf, OptTensor g_kf, OptTensor K,
                                            OptTensor a, double tau, double dt, OptTensor resonance,
                                            double w_scale, int64_t H, bool kuramoto);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_step", &block_step, "fused cached forward of a block", py::call_guard<py::gil_scoped_release>());
  m.def("phase_fields_fwd", &phase_fields_fwd, "phase machinery of an uncached sequence",
        py::call_guard<py::gil_scoped_release>());
  m.def("phase_fields_bwd", &phase_fields_bwd, "its backward", py::call_guard<py::gil_scoped_release>());
}
