//! AdamW (Loshchilov and Hutter) with decoupled weight decay, and gradient-norm clipping. Its
//! moments are plain tensors so a checkpoint can save and restore them exactly.

use tch::Tensor;

use crate::model::Params;

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Per parameter, in [`Params`] order.
    pub state: Vec<Moments>,
    /// Updates taken so far (bias correction).
    pub t: u64,
    /// Room for the largest parameter's denominator, reused by every parameter: no allocation
    /// (and no fresh pages to fault in) per parameter per step.
    scratch: Tensor,
}

pub struct Moments {
    /// The first moment.
    pub m: Tensor,
    /// The second moment divided by (1 − β2): updated in place as `v·β2 + g²` with no
    /// temporary (the factor is folded into the step).
    pub v: Tensor,
    /// Whether the parameter decays.
    pub decay: bool,
}

impl AdamW {
    pub fn new(params: &Params, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let largest = params
            .tensors
            .iter()
            .map(|(_, p)| p.numel())
            .max()
            .unwrap_or(0);
        let scratch = match params.tensors.first() {
            Some((_, p)) => Tensor::empty([largest as i64], (p.kind(), p.device())),
            None => Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu)),
        };
        let state = params
            .tensors
            .iter()
            .map(|(name, p)| Moments {
                m: p.zeros_like(),
                v: p.zeros_like(),
                decay: Params::decays(name, p),
            })
            .collect();
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            state,
            t: 0,
            scratch,
        }
    }

    /// One update of every parameter from its gradient (in [`Params`] order; undefined: no
    /// gradient), at learning rate `lr`.
    pub fn step(&mut self, params: &Params, grads: &[Tensor], lr: f64) {
        let _guard = tch::no_grad_guard();
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        // p -= lr/bc1 · m / (√(v·(1−β2)/bc2) + eps), as one addcdiv: p += m / denom with
        // denom = √v · c1 + c2.
        let c1 = -bc1 / lr * ((1.0 - self.beta2) / bc2).sqrt();
        let c2 = -self.eps * bc1 / lr;
        for (((_, p), s), g) in params.tensors.iter().zip(&mut self.state).zip(grads) {
            if !g.defined() {
                continue;
            }
            let _ = s.m.lerp_(g, 1.0 - self.beta1);
            let _ = s.v.g_mul_scalar_(self.beta2);
            let _ = s.v.addcmul_(g, g);
            if lr <= 0.0 {
                continue;
            }
            let mut p = p.shallow_clone();
            if s.decay && self.weight_decay > 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let mut denom = self
                .scratch
                .narrow(0, 0, p.numel() as i64)
                .view(p.size().as_slice());
            let _ = s.v.sqrt_out(&denom);
            let _ = denom.g_mul_scalar_(c1);
            let _ = denom.g_add_scalar_(c2);
            let _ = p.addcdiv_(&s.m, &denom);
        }
    }
}

/// Gradients of `loss` for every parameter (undefined where it has none), added to `into` when
/// given: fresh tensors, so there is nothing to zero between steps.
pub fn backward(
    loss: &Tensor,
    params: &Params,
    into: Option<Vec<Tensor>>,
) -> Result<Vec<Tensor>, tch::TchError> {
    let inputs: Vec<&Tensor> = params.tensors.iter().map(|(_, p)| p).collect();
    let grads = Tensor::f_run_backward(&[loss], &inputs, false, false)?;
    let Some(mut acc) = into else {
        return Ok(grads);
    };
    let _guard = tch::no_grad_guard();
    for (a, g) in acc.iter_mut().zip(grads) {
        if !g.defined() {
            continue;
        }
        if a.defined() {
            let _ = a.f_add_(&g)?;
        } else {
            *a = g;
        }
    }
    Ok(acc)
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0: no clipping); returns
/// the norm before (a device scalar: reading it waits for the device).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Option<Tensor> {
    let _guard = tch::no_grad_guard();
    let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
    if defined.is_empty() {
        return None;
    }
    let norms: Vec<Tensor> = defined.iter().map(|g| g.norm()).collect();
    let total = Tensor::stack(&norms, 0).norm();
    // On the CPU reading the norm costs nothing, and skipping the scaling when it would
    // multiply by 1 saves a pass over every gradient; on CUDA it would wait for the device.
    let within = total.device() == tch::Device::Cpu
        && total.f_double_value(&[]).is_ok_and(|n| n <= max_norm);
    if max_norm > 0.0 && !within {
        let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        for g in defined {
            let _ = g.shallow_clone().g_mul_(&coef);
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use autoscale_train::preset::ModelConfig;
    use tch::Kind;

    #[test]
    fn adamw_matches_the_textbook_update_and_clipping_caps_the_norm() {
        let config = ModelConfig::preset("gpt2-tiny", 257, 256, None).unwrap();
        let model = Model::new(&config, tch::Device::Cpu, 0);
        let (name, p) = &model.params.tensors[0];
        assert!(name.ends_with("wte.weight"));
        let before = p.detach().copy();
        let loss = (p * 0.5).sum(Kind::Float);
        let grads = backward(&loss, &model.params, None).unwrap();
        assert!(grads[0].allclose(&Tensor::full_like(p, 0.5), 1e-7, 1e-7, false));
        assert!(!grads[1].defined());
        // Accumulation adds.
        let twice = backward(&(p * 0.5).sum(Kind::Float), &model.params, Some(grads)).unwrap();
        assert!(twice[0].allclose(&Tensor::full_like(p, 1.0), 1e-7, 1e-7, false));
        let mut opt = AdamW::new(&model.params, 0.9, 0.999, 1e-8, 0.01);
        let lr = 1e-2;
        opt.step(&model.params, &twice, lr);
        // Step 1: m̂ = g, v̂ = g², so the update is lr · g / (|g| + eps), after the decay.
        let expected = &before * (1.0 - lr * 0.01) - lr * 1.0 / (1.0 + 1e-8);
        assert!(p.allclose(&expected, 1e-6, 1e-7, false));
        // Step 2 against the formula, with g = 1 again.
        let (m, v) = (0.9 * 0.1 + 0.1, 0.999 * 0.001 + 0.001);
        let (mh, vh) = (m / (1.0 - 0.81), v / (1.0 - 0.999f64.powi(2)));
        let expected = p * (1.0 - lr * 0.01) - lr * mh / (vh.sqrt() + 1e-8);
        opt.step(&model.params, &twice, lr);
        assert!(p.allclose(&expected, 1e-6, 1e-7, false));
        // Clipping scales the gradients to the max norm.
        let norm = f64::try_from(clip_grad_norm(&twice, 1.0).unwrap()).unwrap();
        let expected_norm = (p.numel() as f64).sqrt();
        assert!(
            (norm - expected_norm).abs() < 1e-3 * expected_norm,
            "{norm}"
        );
        let after = f64::try_from(twice[0].norm()).unwrap();
        assert!((after - 1.0).abs() < 1e-4, "{after}");
    }
}
