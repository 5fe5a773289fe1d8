// One decoding step (one token per row) of a block's phase machinery, fused into one call.
// The eager reference is core_model/block.py with kuramoto.py, gating.py and attention.py; for
// theta (B, F) and the running sum S (B, F, 2) of the Kuramoto mean field:
//
//   u      = (cos theta, sin theta),  u_perp = (-sin theta, cos theta)
//   S'     = S + u,  z = S' / n,  r = mean_k |z_k|                      (prefix mean field)
//   gate   = sigmoid(logit + a (r - tau))                                (coherence gate, g / 2)
//   q_feat = w_h * u (flattened as cos_0, sin_0, cos_1, ...),  k_feat = u (resonant attention)
//   theta' = theta + dt (omega + K z . u_perp + ext . u_perp)            (Kuramoto step)
//
// omega and the gate logit are read from the block's input projection `proj` (B, W) at columns
// omega_col.. and gate_col (-1: that part is off). Every tensor is float32 on the CPU; a None
// switches its part off, and the matching output is then empty.
#include <torch/extension.h>

#include <cmath>
#include <vector>

using OptTensor = c10::optional<torch::Tensor>;

std::vector<torch::Tensor> phase_step(torch::Tensor theta, torch::Tensor proj, int64_t omega_col,
                                      int64_t gate_col, OptTensor past_sum_, OptTensor count_,
                                      OptTensor ext_, OptTensor resonance_, double w_scale,
                                      OptTensor K_, double dt, OptTensor a_, double tau) {
  // w_h = resonance_h * w_scale (attention.py: phase_weight); None switches a part off
  theta = theta.contiguous();
  proj = proj.contiguous();
  auto opts = theta.options();
  auto none = torch::empty({0}, opts);
  auto past_sum = past_sum_.has_value() ? past_sum_->contiguous() : none;
  auto count = count_.has_value() ? count_->contiguous() : none;
  auto ext = ext_.has_value() ? ext_->contiguous() : none;
  auto w = resonance_.has_value() ? resonance_->contiguous() : none;
  auto K = K_.has_value() ? *K_ : none;
  auto a = a_.has_value() ? *a_ : none;
  const int64_t B = theta.size(0), F = theta.numel() / B, W = proj.numel() / B;
  const bool field = past_sum.numel() > 0, kuramoto = omega_col >= 0, gated = gate_col >= 0;
  const bool resonant = w.numel() > 0, external = ext.numel() > 0;
  TORCH_CHECK(!(kuramoto || gated) || field, "phase_step: the Kuramoto step and the gate need the mean field");
  const int64_t H = w.numel();
  auto u = torch::empty({B, 1, 1, 2 * F}, opts);
  auto q_feat = resonant ? torch::empty({B, H, 1, 2 * F}, opts) : none;
  auto new_sum = field ? torch::empty({B, 1, F, 2}, opts) : none;
  auto order = field ? torch::empty({B, 1, 1}, opts) : none;
  auto gate = gated ? torch::empty({B, 1, 1}, opts) : none;
  auto theta_new = kuramoto ? torch::empty({B, 1, F}, opts) : none;
  const float* th = theta.data_ptr<float>();
  const float* pr = proj.data_ptr<float>();
  float* up = u.data_ptr<float>();
  const float half_pi = static_cast<float>(M_PI / 2);
  const float k_coupling = kuramoto ? K.item<float>() : 0.f;
  const float a_gate = gated ? a.item<float>() : 0.f;
  for (int64_t b = 0; b < B; ++b) {
    float r = 0.f;
    const float n = field ? count.data_ptr<float>()[b] : 1.f;
    for (int64_t k = 0; k < F; ++k) {
      const float t = th[b * F + k];
      // the eager path computes cos(theta - s) for s = 0, pi/2, -pi/2
      const float c = std::cos(t), s = std::cos(t - half_pi), ms = std::cos(t + half_pi);
      up[b * 2 * F + 2 * k] = c;
      up[b * 2 * F + 2 * k + 1] = s;
      float zr = 0.f, zi = 0.f;
      if (field) {
        const float* ps = past_sum.data_ptr<float>() + (b * F + k) * 2;
        float* ns = new_sum.data_ptr<float>() + (b * F + k) * 2;
        ns[0] = ps[0] + c;
        ns[1] = ps[1] + s;
        zr = ns[0] / n;
        zi = ns[1] / n;
        r += std::sqrt(zr * zr + zi * zi);
      }
      if (kuramoto) {
        float d = pr[b * W + omega_col + k] + k_coupling * (zr * ms + zi * c);  // z . u_perp
        if (external) {
          const float* e = ext.data_ptr<float>() + (b * F + k) * 2;
          d += e[0] * ms + e[1] * c;
        }
        theta_new.data_ptr<float>()[b * F + k] = t + static_cast<float>(dt) * d;
      }
    }
    if (field) order.data_ptr<float>()[b] = r / static_cast<float>(F);
    if (gated) {
      const float x = pr[b * W + gate_col] + a_gate * (r / static_cast<float>(F) - static_cast<float>(tau));
      gate.data_ptr<float>()[b] = 1.f / (1.f + std::exp(-x));
    }
    if (resonant) {
      const float* wp = w.data_ptr<float>();
      float* qp = q_feat.data_ptr<float>() + b * H * 2 * F;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t j = 0; j < 2 * F; ++j)
          qp[h * 2 * F + j] = (wp[h] * static_cast<float>(w_scale)) * up[b * 2 * F + j];
    }
  }
  return {u, q_feat, new_sum, order, gate, theta_new};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("phase_step", &phase_step, "fused decoding phase step"); }
