// The phase machinery of one block over a whole uncached, unpadded sequence (training and
// uncached forwards), forward and backward, as two calls. The eager reference is kuramoto.py,
// gating.py and ResonantAttention.phase_features. For row b, position t (n_t = t + 1 tokens in
// its prefix) and oscillator k:
//
//   u_t     = (cos theta_t, sin theta_t)
//   z_t     = (1 / n_t) sum_{j <= t} u_j,   r_t = (1/F) sum_k |z_{t,k}|          (prefix mean field)
//   gate_t  = sigmoid(logit_t + a (r_t - tau))                                   (coherence gate, g / 2)
//   p_t     = z_t . u_perp_t = Im z cos theta - Re z sin theta
//   theta'_t = theta_t + dt (omega_t + K p_t)                                    (Kuramoto step)
//   qf_{h,t} = w_h u_t,  kf_{h,t} = u_t,   w_h = resonance_h * w_scale           (attention phase features)
//
// Backward, for upstream gradients G (any of them may be absent):
//
//   dL/domega = dt G_theta',  dL/dK = dt sum G_theta' p,  gp = dt K G_theta'
//   dL/dz     = gp u_perp + (G_r + G_gate s(1-s) a) / F * z / |z|                (s = gate)
//   dL/du_j   = sum_{t >= j} dL/dz_t / n_t + sum_h (w_h G_qf + G_kf)             (reverse prefix sum)
//   dL/dtheta = G_theta' - gp (Re z cos theta + Im z sin theta) + dL/du . u_perp
//   dL/dlogit = G_gate s(1-s),  dL/da = sum G_gate s(1-s)(r - tau),  dL/dresonance_h = w_scale sum G_qf . u
//
// Float32 CPU tensors; omega and logit may be strided views of the block's projection (their last
// dimension contiguous). The rows of a batch are independent: they run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

using OptTensor = c10::optional<torch::Tensor>;

namespace {

void check_float_cpu(std::initializer_list<OptTensor> ts, const char* who) {
  for (const OptTensor& t : ts)
    TORCH_CHECK(!t.has_value() || (t->device().is_cpu() && t->scalar_type() == torch::kFloat), who,
                ": float32 CPU tensors only");
}

// A (B, T, C) view read as rows: element (b, t, c) at b * s0 + t * s1 + c
struct Rows {
  const float* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  Rows() = default;
  Rows(const torch::Tensor& t, int64_t B, int64_t T, int64_t C, const char* what) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == T && t.size(2) == C && (C == 1 || t.stride(2) == 1),
                "phase_fields: ", what, " must be (B, T, ", C, ") with a contiguous last dimension");
    p = t.data_ptr<float>();
    s0 = t.stride(0);
    s1 = t.stride(1);
  }
  const float* at(int64_t b, int64_t t) const { return p + b * s0 + t * s1; }
};

// w_h = resonance_h * w_scale for every head (empty when resonant attention is off)
std::vector<float> head_weights(const OptTensor& resonance, int64_t H, double w_scale) {
  std::vector<float> w;
  if (!resonance.has_value()) return w;
  const auto res = resonance->contiguous();
  for (int64_t h = 0; h < H; ++h) w.push_back(res.data_ptr<float>()[h] * static_cast<float>(w_scale));
  return w;
}

}  // namespace

// Returns theta' (B, T, F), gate (B, T, 1), order (B, T, 1), qf (B, H, T, 2F), kf (B, H, T, 2F) and
// z (B, T, F, 2) (kept for the backward); a part switched off gives an empty tensor.
std::vector<torch::Tensor> phase_fields_fwd(torch::Tensor theta, OptTensor omega_, OptTensor logit_, OptTensor K_,
                                            OptTensor a_, double tau, double dt, OptTensor resonance_,
                                            double w_scale, int64_t H, bool field) {
  check_float_cpu({theta, omega_, logit_, K_, a_, resonance_}, "phase_fields");
  TORCH_CHECK(theta.dim() == 3 && theta.size(0) > 0 && theta.size(1) > 0 && theta.size(2) > 0,
              "phase_fields: theta must be a non-empty (B, T, F)");
  theta = theta.contiguous();
  const int64_t B = theta.size(0), T = theta.size(1), F = theta.size(2);
  const bool kuramoto = omega_.has_value(), gated = logit_.has_value(), resonant = resonance_.has_value();
  TORCH_CHECK(!(kuramoto || gated) || field, "phase_fields: the Kuramoto step and the gate need the mean field");
  TORCH_CHECK(!kuramoto || (K_.has_value() && K_->numel() == 1), "phase_fields: the Kuramoto step needs K");
  TORCH_CHECK(!gated || (a_.has_value() && a_->numel() == 1), "phase_fields: the gate needs its weight");
  TORCH_CHECK(!resonant || (H > 0 && resonance_->numel() == H), "phase_fields: resonance weights");
  const Rows omega = kuramoto ? Rows(*omega_, B, T, F, "omega") : Rows();
  const Rows logit = gated ? Rows(*logit_, B, T, 1, "gate logit") : Rows();
  auto opts = theta.options();
  auto none = torch::empty({0}, opts);
  auto theta_new = kuramoto ? torch::empty({B, T, F}, opts) : none;
  auto gate = gated ? torch::empty({B, T, 1}, opts) : none;
  auto order = field ? torch::empty({B, T, 1}, opts) : none;
  auto z = field ? torch::empty({B, T, F, 2}, opts) : none;
  auto qf = resonant ? torch::empty({B, H, T, 2 * F}, opts) : none;
  auto kf = resonant ? torch::empty({B, H, T, 2 * F}, opts) : none;
  const float K = kuramoto ? K_->item<float>() : 0.f, a = gated ? a_->item<float>() : 0.f;
  const std::vector<float> w = head_weights(resonance_, H, w_scale);
  // cos and sin of every phase in two vectorised ATen calls: the scalar libm calls were most of
  // this kernel's time
  const auto cos_t = theta.cos(), sin_t = theta.sin();
  const float *th = theta.data_ptr<float>(), *cos_p = cos_t.data_ptr<float>(), *sin_p = sin_t.data_ptr<float>();
  float *thn = kuramoto ? theta_new.data_ptr<float>() : nullptr, *gp = gated ? gate.data_ptr<float>() : nullptr;
  float *op = field ? order.data_ptr<float>() : nullptr, *zp = field ? z.data_ptr<float>() : nullptr;
  float *qp = resonant ? qf.data_ptr<float>() : nullptr, *kp = resonant ? kf.data_ptr<float>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> S(2 * F);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(S.begin(), S.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t bt = b * T + t;
        const float n = static_cast<float>(t + 1);
        float r = 0.f;
        for (int64_t k = 0; k < F; ++k) {
          const float th_k = th[bt * F + k];
          const float c = cos_p[bt * F + k], s = sin_p[bt * F + k], ms = -s;
          if (field) {
            S[2 * k] += c;
            S[2 * k + 1] += s;
            const float zr = S[2 * k] / n, zi = S[2 * k + 1] / n;
            zp[bt * F * 2 + 2 * k] = zr;
            zp[bt * F * 2 + 2 * k + 1] = zi;
            r += std::sqrt(zr * zr + zi * zi);
            if (kuramoto)
              thn[bt * F + k] = th_k + static_cast<float>(dt) * (omega.at(b, t)[k] + K * (zr * ms + zi * c));
          }
        }
        if (resonant) {  // contiguous rows of 2F per head: (cos_0, sin_0, cos_1, ...)
          for (int64_t h = 0; h < H; ++h) {
            float *q = qp + ((b * H + h) * T + t) * 2 * F, *kr = kp + ((b * H + h) * T + t) * 2 * F;
            for (int64_t k = 0; k < F; ++k) {
              const float c = cos_p[bt * F + k], s = sin_p[bt * F + k];
              q[2 * k] = w[h] * c;
              q[2 * k + 1] = w[h] * s;
              kr[2 * k] = c;
              kr[2 * k + 1] = s;
            }
          }
        }
        if (field) op[bt] = r / static_cast<float>(F);
        if (gated) {
          const float x = logit.at(b, t)[0] + a * (r / static_cast<float>(F) - static_cast<float>(tau));
          gp[bt] = 1.f / (1.f + std::exp(-x));
        }
      }
    }
  });
  return {theta_new, gate, order, qf, kf, z};
}

// Gradients: theta (B, T, F), omega (B, T, F), gate logit (B, T, 1), K (), a (), resonance (H);
// empty where the part is off.
std::vector<torch::Tensor> phase_fields_bwd(torch::Tensor theta, torch::Tensor z, torch::Tensor gate,
                                            torch::Tensor order, OptTensor g_theta_, OptTensor g_gate_,
                                            OptTensor g_order_, OptTensor g_qf_, OptTensor g_kf_, OptTensor K_,
                                            OptTensor a_, double tau, double dt, OptTensor resonance_,
                                            double w_scale, int64_t H, bool kuramoto) {
  check_float_cpu({theta, z, gate, order, g_theta_, g_gate_, g_order_, g_qf_, g_kf_, K_, a_, resonance_},
                  "phase_fields_bwd");
  theta = theta.contiguous();
  const int64_t B = theta.size(0), T = theta.size(1), F = theta.size(2);
  const bool field = z.numel() > 0, gated = gate.numel() > 0, resonant = resonance_.has_value();
  TORCH_CHECK(!field || (z.numel() == B * T * F * 2 && order.numel() == B * T), "phase_fields_bwd: saved fields");
  TORCH_CHECK(!gated || gate.numel() == B * T, "phase_fields_bwd: saved gate");
  // an upstream gradient's data (nullptr when absent), its contiguous copy kept alive in `keep`
  std::vector<torch::Tensor> keep;
  auto read = [&](const OptTensor& t, int64_t numel, const char* what) -> const float* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->numel() == numel, "phase_fields_bwd: gradient of ", what, " has the wrong size");
    keep.push_back(t->contiguous());
    return keep.back().data_ptr<float>();
  };
  const float* G_th = kuramoto ? read(g_theta_, B * T * F, "theta'") : nullptr;
  const float* G_gate = gated ? read(g_gate_, B * T, "gate") : nullptr;
  const float* G_r = field ? read(g_order_, B * T, "order") : nullptr;
  const float* G_qf = resonant ? read(g_qf_, B * H * T * 2 * F, "qf") : nullptr;
  const float* G_kf = resonant ? read(g_kf_, B * H * T * 2 * F, "kf") : nullptr;
  auto opts = theta.options();
  auto none = torch::empty({0}, opts);
  auto g_theta = torch::empty({B, T, F}, opts);
  auto g_omega = kuramoto ? torch::empty({B, T, F}, opts) : none;
  auto g_logit = gated ? torch::empty({B, T, 1}, opts) : none;
  const float K = kuramoto ? K_->item<float>() : 0.f, a = gated ? a_->item<float>() : 0.f;
  const std::vector<float> w = head_weights(resonance_, H, w_scale);
  const auto cos_t = theta.cos(), sin_t = theta.sin();
  const float *cos_p = cos_t.data_ptr<float>(), *sin_p = sin_t.data_ptr<float>();
  const float* zp = field ? z.data_ptr<float>() : nullptr;
  const float *sp = gated ? gate.data_ptr<float>() : nullptr, *rp = field ? order.data_ptr<float>() : nullptr;
  float *gth = g_theta.data_ptr<float>(), *gom = kuramoto ? g_omega.data_ptr<float>() : nullptr;
  float* glg = gated ? g_logit.data_ptr<float>() : nullptr;
  const float fdt = static_cast<float>(dt), inv_F = 1.f / static_cast<float>(F);
  // per-row partial sums of the scalar gradients, reduced in order afterwards (deterministic)
  std::vector<double> sum_K(B, 0.0), sum_a(B, 0.0), sum_res(B * std::max<int64_t>(H, 1), 0.0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(2 * F), gfeat(2 * F);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t bt = b * T + t;
        const float n = static_cast<float>(t + 1);
        if (resonant) {  // the features' gradient with respect to u, over the heads' contiguous rows
          std::fill(gfeat.begin(), gfeat.end(), 0.f);
          for (int64_t h = 0; h < H; ++h) {
            const int64_t o = ((b * H + h) * T + t) * 2 * F;
            if (G_qf) {
              double dot = 0.0;
              for (int64_t j = 0; j < 2 * F; ++j) {
                gfeat[j] += w[h] * G_qf[o + j];
                dot += static_cast<double>(G_qf[o + j]) * (j % 2 ? sin_p[bt * F + j / 2] : cos_p[bt * F + j / 2]);
              }
              sum_res[b * H + h] += dot;
            }
            if (G_kf)
              for (int64_t j = 0; j < 2 * F; ++j) gfeat[j] += G_kf[o + j];
          }
        }
        float g_r = G_r ? G_r[bt] : 0.f;
        if (gated) {
          const float s = sp[bt], gs = G_gate ? G_gate[bt] * s * (1.f - s) : 0.f;
          glg[bt] = gs;
          g_r += gs * a;
          sum_a[b] += static_cast<double>(gs) * (rp[bt] - tau);
        }
        for (int64_t k = 0; k < F; ++k) {
          const float c = cos_p[bt * F + k], s = sin_p[bt * F + k];
          float g = 0.f, gzr = 0.f, gzi = 0.f;
          if (field) {
            const float zr = zp[bt * F * 2 + 2 * k], zi = zp[bt * F * 2 + 2 * k + 1];
            if (kuramoto) {
              const float go = G_th ? G_th[bt * F + k] : 0.f;
              gom[bt * F + k] = fdt * go;
              sum_K[b] += static_cast<double>(fdt * go) * (zi * c - zr * s);
              const float gp = fdt * K * go;
              g += go - gp * (zr * c + zi * s);
              gzr -= gp * s;
              gzi += gp * c;
            }
            const float m = std::sqrt(zr * zr + zi * zi);
            if (g_r != 0.f && m > 0.f) {
              gzr += g_r * inv_F * zr / m;
              gzi += g_r * inv_F * zi / m;
            }
            acc[2 * k] += gzr / n;
            acc[2 * k + 1] += gzi / n;
          }
          float gc = field ? acc[2 * k] : 0.f, gsn = field ? acc[2 * k + 1] : 0.f;
          if (resonant) {
            gc += gfeat[2 * k];
            gsn += gfeat[2 * k + 1];
          }
          gth[bt * F + k] = g - s * gc + c * gsn;  // du/dtheta = u_perp = (-sin, cos)
        }
      }
    }
  });
  double tK = 0.0, ta = 0.0;
  for (int64_t b = 0; b < B; ++b) tK += sum_K[b], ta += sum_a[b];
  auto g_K = kuramoto ? torch::full({}, static_cast<float>(tK), opts) : none;
  auto g_a = gated ? torch::full({}, static_cast<float>(ta), opts) : none;
  auto g_res = resonant ? torch::empty({H}, opts) : none;
  for (int64_t h = 0; h < (resonant ? H : 0); ++h) {
    double total = 0.0;
    for (int64_t b = 0; b < B; ++b) total += sum_res[b * H + h];
    g_res.data_ptr<float>()[h] = static_cast<float>(total * w_scale);
  }
  return {g_theta, g_omega, g_logit, g_K, g_a, g_res};
}
