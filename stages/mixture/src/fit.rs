//! Fitting DDO's per-domain response curve `y(x) = (x + a)^(-b) + c` to (multiplier, objective
//! ratio) points: Levenberg-Marquardt from `(1, 1, 1)` like the reference implementation
//! (scipy's `curve_fit` default start), plus an exhaustive search for every exact interpolant
//! when there are exactly three points, since three points admit more than one.

use serde::{Deserialize, Serialize};

use crate::MixError;

/// `y(x) = (x + a)^(-b) + c`, defined for `x > -a`, decreasing and convex when `b > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerCurve {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

impl PowerCurve {
    pub fn eval(&self, x: f64) -> f64 {
        (x + self.a).powf(-self.b) + self.c
    }

    fn params(&self) -> [f64; 3] {
        [self.a, self.b, self.c]
    }

    fn from_params(p: [f64; 3]) -> Self {
        Self {
            a: p[0],
            b: p[1],
            c: p[2],
        }
    }
}

/// The fitted curve and how well it fits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurveFit {
    pub curve: PowerCurve,
    /// With exactly three points: another exact interpolant, when one exists. DDO's answer
    /// depends on which is used, so the report shows both.
    pub alternate: Option<PowerCurve>,
    /// Root-mean-square of `y_fit(x) - y` over the points.
    pub rms_residual: f64,
}

/// Levenberg-Marquardt steps of a bootstrap refit: from a nearby start it interpolates in a
/// few dozen, and a crawl past that buys nothing the resample's noise does not swamp.
const REFIT_STEPS: u32 = 100;

/// Residual RMS below which a three-point fit counts as interpolating.
const EXACT_RMS: f64 = 1e-9;

/// Fits `(x + a)^(-b) + c` to `points` (multiplier, objective ratio) under `b > 0` and
/// `x + a > 0` at every point. Three points: the exact interpolant Levenberg-Marquardt reaches
/// from `(1, 1, 1)`, with any other exact interpolant as `alternate`. More points: least squares.
/// `domain` only names the curve in errors.
pub fn fit_power_curve(domain: &str, points: &[(f64, f64)]) -> Result<CurveFit, MixError> {
    fit(domain, points, true)
}

/// [`fit_power_curve`]'s `curve` without its `alternate`: the exhaustive search for other
/// exact interpolants runs only when Levenberg-Marquardt falls short of one, which makes the
/// bootstrap's hundreds of refits cheap.
pub(crate) fn fit_primary_curve(domain: &str, points: &[(f64, f64)]) -> Result<CurveFit, MixError> {
    fit(domain, points, false)
}

/// A fit started from a nearby curve, such as the point estimate's for a bootstrap resample:
/// Levenberg-Marquardt then stays on that curve's branch and takes a few steps. When that does
/// not interpolate three points that a decreasing convex curve could pass through, it also
/// tries the usual start `(1, 1, 1)`, and otherwise keeps the better least-squares fit: the
/// exhaustive search of [`fit_power_curve`] costs a thousand times more, too much for hundreds
/// of resamples, and a resample that no curve interpolates is within its noise of one.
pub(crate) fn refit_power_curve(
    domain: &str,
    points: &[(f64, f64)],
    start: PowerCurve,
) -> Result<CurveFit, MixError> {
    let (xs, ys) = checked_points(domain, points)?;
    let interpolable = xs.len() == 3
        && ys[0] > ys[1]
        && ys[1] > ys[2]
        && (ys[1] - ys[0]) / (xs[1] - xs[0]) < (ys[2] - ys[1]) / (xs[2] - xs[1]);
    let fits = |p: Option<PowerCurve>| p.map(|p| (rms(&xs, &ys, p), p));
    let mut best = fits(levenberg_marquardt(&xs, &ys, start.params(), REFIT_STEPS));
    if interpolable && !best.is_some_and(|(r, _)| r <= EXACT_RMS) {
        let usual = fits(levenberg_marquardt(&xs, &ys, [1.0, 1.0, 1.0], REFIT_STEPS));
        if let Some(u) = usual
            && best.is_none_or(|b| u.0 < b.0)
        {
            best = Some(u);
        }
    }
    match best {
        Some((rms_residual, curve)) => Ok(CurveFit {
            curve,
            alternate: None,
            rms_residual,
        }),
        None => fit(domain, points, false),
    }
}

fn fit(domain: &str, points: &[(f64, f64)], want_alternate: bool) -> Result<CurveFit, MixError> {
    let (xs, ys) = checked_points(domain, points)?;
    let lm = levenberg_marquardt(&xs, &ys, [1.0, 1.0, 1.0], 2000);
    let lm_exact = lm.is_some_and(|p| rms(&xs, &ys, p) <= EXACT_RMS);
    let exact = if xs.len() == 3 && (want_alternate || !lm_exact) {
        exact_interpolants(&xs, &ys)
    } else {
        Vec::new()
    };
    let (curve, alternate) = match lm {
        Some(p) if rms(&xs, &ys, p) <= EXACT_RMS || exact.is_empty() => {
            let alternate = exact.iter().copied().find(|q| !same_curve(q, &p));
            (p, alternate)
        }
        // LM stalled short of an exact interpolant: take the one nearest where it stopped.
        Some(p) => {
            let best = nearest(&exact, &p);
            (best, exact.iter().copied().find(|q| !same_curve(q, &best)))
        }
        None => match exact.first() {
            Some(&first) => (first, exact.get(1).copied()),
            None => {
                return Err(MixError::FitFailed {
                    domain: domain.to_owned(),
                    reason: "Levenberg-Marquardt found no finite fit".to_owned(),
                });
            }
        },
    };
    Ok(CurveFit {
        rms_residual: rms(&xs, &ys, curve),
        curve,
        alternate,
    })
}

/// The points sorted by multiplier, once they are valid and the ratio falls with more data.
fn checked_points(domain: &str, points: &[(f64, f64)]) -> Result<(Vec<f64>, Vec<f64>), MixError> {
    let failed = |reason: String| MixError::FitFailed {
        domain: domain.to_owned(),
        reason,
    };
    if points.len() < 3 {
        return Err(failed(format!(
            "{} point(s); three parameters need at least 3",
            points.len()
        )));
    }
    if let Some(&(x, y)) = points
        .iter()
        .find(|(x, y)| !(x.is_finite() && *x > 0.0 && y.is_finite()))
    {
        return Err(failed(format!(
            "point ({x}, {y}) is not a positive multiplier with a finite ratio"
        )));
    }
    let mut pts = points.to_vec();
    pts.sort_by(|p, q| p.0.total_cmp(&q.0));
    if pts.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(failed("two points share a multiplier".to_owned()));
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
    if log_slope(&xs, &ys) >= 0.0 {
        let detail = pts
            .iter()
            .map(|(x, y)| format!("y({x})={y:.4}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(MixError::NotDecreasing {
            domain: domain.to_owned(),
            detail,
        });
    }
    Ok((xs, ys))
}

/// Least-squares slope of `y` against `ln x`: the sign says whether more data helps at all.
fn log_slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let lx: Vec<f64> = xs.iter().map(|x| x.ln()).collect();
    let mx = lx.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let cov: f64 = lx.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = lx.iter().map(|x| (x - mx).powi(2)).sum();
    cov / var
}

fn rms(xs: &[f64], ys: &[f64], c: PowerCurve) -> f64 {
    (sse(xs, ys, c.params()) / xs.len() as f64).sqrt()
}

fn sse(xs: &[f64], ys: &[f64], p: [f64; 3]) -> f64 {
    let c = PowerCurve::from_params(p);
    xs.iter()
        .zip(ys)
        .map(|(&x, &y)| (c.eval(x) - y).powi(2))
        .sum()
}

fn same_curve(p: &PowerCurve, q: &PowerCurve) -> bool {
    p.params()
        .iter()
        .zip(q.params())
        .all(|(u, v)| (u - v).abs() <= 1e-6 * (1.0 + u.abs().max(v.abs())))
}

fn nearest(candidates: &[PowerCurve], p: &PowerCurve) -> PowerCurve {
    let dist = |q: &PowerCurve| {
        q.params()
            .iter()
            .zip(p.params())
            .map(|(u, v)| (u - v).powi(2))
            .sum::<f64>()
    };
    candidates
        .iter()
        .copied()
        .min_by(|q, r| dist(q).total_cmp(&dist(r)))
        .unwrap_or(*p)
}

/// Levenberg-Marquardt with Marquardt's diagonal scaling. Steps that leave the feasible region
/// (`b > 0`, `x + a > 0` at every point) are rejected like steps that raise the error, so the
/// curve never crosses its pole. `None` when the start is infeasible or nothing finite results.
fn levenberg_marquardt(
    xs: &[f64],
    ys: &[f64],
    start: [f64; 3],
    max_steps: u32,
) -> Option<PowerCurve> {
    let x_min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let feasible =
        |p: [f64; 3]| p.iter().all(|v| v.is_finite()) && p[1] > 0.0 && x_min + p[0] > 0.0;
    if !feasible(start) {
        return None;
    }
    let mut p = start;
    let mut err = sse(xs, ys, p);
    let mut mu = 1e-3;
    for _ in 0..max_steps {
        if !err.is_finite() || err < 1e-30 {
            break;
        }
        let (mut h, mut g) = ([[0.0; 3]; 3], [0.0; 3]);
        for (&x, &y) in xs.iter().zip(ys) {
            let base = x + p[0];
            let pow = base.powf(-p[1]);
            let r = pow + p[2] - y;
            let j = [-p[1] * pow / base, -pow * base.ln(), 1.0];
            for row in 0..3 {
                g[row] += j[row] * r;
                for col in 0..3 {
                    h[row][col] += j[row] * j[col];
                }
            }
        }
        let mut improved = false;
        while mu < 1e20 {
            let mut damped = h;
            for (i, row) in damped.iter_mut().enumerate() {
                row[i] += mu * h[i][i].max(1e-12);
            }
            let step = solve3(damped, [-g[0], -g[1], -g[2]]);
            let candidate = step.map(|d| [p[0] + d[0], p[1] + d[1], p[2] + d[2]]);
            match candidate
                .filter(|&q| feasible(q))
                .map(|q| (q, sse(xs, ys, q)))
            {
                Some((q, e)) if e < err => {
                    let moved = q
                        .iter()
                        .zip(p)
                        .any(|(u, v)| (u - v).abs() > 1e-15 * (1.0 + v.abs()));
                    let gain = err - e;
                    p = q;
                    err = e;
                    mu = (mu * 0.3).max(1e-15);
                    improved = moved && gain > 1e-16 * err;
                    break;
                }
                _ => mu *= 4.0,
            }
        }
        if !improved {
            break;
        }
    }
    (err.is_finite() && feasible(p)).then(|| PowerCurve::from_params(p))
}

/// Gaussian elimination with partial pivoting; `None` when singular.
fn solve3(mut m: [[f64; 3]; 3], mut v: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
        if m[pivot][col].abs() < 1e-300 {
            return None;
        }
        m.swap(col, pivot);
        v.swap(col, pivot);
        for row in col + 1..3 {
            let f = m[row][col] / m[col][col];
            let pivot_row = m[col];
            for (x, p) in m[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            v[row] -= f * v[col];
        }
    }
    let mut out = [0.0; 3];
    for row in (0..3).rev() {
        let tail: f64 = (row + 1..3).map(|k| m[row][k] * out[k]).sum();
        out[row] = (v[row] - tail) / m[row][row];
    }
    out.iter().all(|x| x.is_finite()).then_some(out)
}

/// Every `(a, b, c)` with `b` in `[1e-4, 1e4]` that passes exactly through three points sorted
/// by `x` with `y` strictly decreasing.
///
/// Writing `z = y_1 - c` and `k = 1/b`, interpolation means `x_j + a = (y_j - c)^(-k)`, so
/// `x_1 - x_0 = z^(-k) - (z + d_0)^(-k)` and `x_2 - x_1 = (z - d_1)^(-k) - z^(-k)` with
/// `d_0 = y_0 - y_1`, `d_1 = y_1 - y_2`. The first equation fixes `z` for each `k` (its right
/// side falls strictly in `z`); solutions are the roots in `k` of the second, found by a scan
/// for sign changes on a log grid and bisection. Then `a = z^(-k) - x_1`, `c = y_1 - z`.
fn exact_interpolants(xs: &[f64], ys: &[f64]) -> Vec<PowerCurve> {
    let (d0, d1) = (ys[0] - ys[1], ys[1] - ys[2]);
    if !(d0 > 0.0 && d1 > 0.0) {
        return Vec::new();
    }
    let (gap0, gap1) = ((xs[1] - xs[0]).ln(), (xs[2] - xs[1]).ln());
    // ln(z^(-k) - (z + d0)^(-k)), written to avoid cancellation when d0 << z.
    let ln_h0 = |ln_k: f64, ln_z: f64| {
        let (k, z) = (ln_k.exp(), ln_z.exp());
        -k * ln_z + (-(-k * (d0 / z).ln_1p()).exp_m1()).ln()
    };
    let z_of = |ln_k: f64| bisect_decreasing(|t| ln_h0(ln_k, t) - gap0, -60.0, 60.0);
    // Sign of the second equation's miss; +inf when z <= d1, where its left side blows up.
    let miss = |ln_k: f64| {
        let ln_z = z_of(ln_k)?;
        let (k, z) = (ln_k.exp(), ln_z.exp());
        if z <= d1 {
            return Some(f64::INFINITY);
        }
        Some(-k * ln_z + (-k * (-d1 / z).ln_1p()).exp_m1().ln() - gap1)
    };
    let (lo, hi, steps) = ((1e-4f64).ln(), (1e4f64).ln(), 1200);
    let grid: Vec<(f64, Option<f64>)> = (0..=steps)
        .map(|i| lo + (hi - lo) * f64::from(i) / f64::from(steps))
        .map(|t| (t, miss(t).filter(|m| !m.is_nan())))
        .collect();
    let mut roots = Vec::new();
    for w in grid.windows(2) {
        let ((t0, Some(m0)), (t1, Some(m1))) = (w[0], w[1]) else {
            continue;
        };
        if (m0 > 0.0) == (m1 > 0.0) {
            continue;
        }
        let (mut a, mut b) = (t0, t1);
        for _ in 0..200 {
            let mid = 0.5 * (a + b);
            match miss(mid) {
                Some(m) if (m > 0.0) == (m0 > 0.0) => a = mid,
                Some(_) => b = mid,
                None => break,
            }
        }
        let ln_k = 0.5 * (a + b);
        let Some(ln_z) = z_of(ln_k) else { continue };
        let k = ln_k.exp();
        let curve = PowerCurve {
            a: (-k * ln_z).exp() - xs[1],
            b: 1.0 / k,
            c: ys[1] - ln_z.exp(),
        };
        if xs[0] + curve.a > 0.0 && rms(xs, ys, curve) <= EXACT_RMS {
            roots.push(curve);
        }
    }
    roots
}

/// Root of a decreasing function on `[lo, hi]`, or `None` when the ends do not bracket one.
fn bisect_decreasing(f: impl Fn(f64) -> f64, mut lo: f64, mut hi: f64) -> Option<f64> {
    if !(f(lo) >= 0.0 && f(hi) <= 0.0) {
        return None;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if f(mid) > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-15 {
            break;
        }
    }
    Some(0.5 * (lo + hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(c: PowerCurve, xs: &[f64]) -> Vec<(f64, f64)> {
        xs.iter().map(|&x| (x, c.eval(x))).collect()
    }

    #[test]
    fn three_points_are_interpolated_and_both_solutions_found() {
        let truth = PowerCurve {
            a: 0.5,
            b: 0.8,
            c: 1.0 - 1.5f64.powf(-0.8),
        };
        let fit = fit_power_curve("books", &points(truth, &[0.2, 1.0, 3.0])).expect("fits");
        assert!(fit.rms_residual < 1e-9, "{fit:?}");
        let alt = fit.alternate.expect("a second exact interpolant");
        assert!(!same_curve(&fit.curve, &alt));
        for c in [fit.curve, alt] {
            for (x, y) in points(truth, &[0.2, 1.0, 3.0]) {
                assert!((c.eval(x) - y).abs() < 1e-8, "{c:?} misses ({x}, {y})");
            }
        }
        assert!(
            same_curve(&fit.curve, &truth) || same_curve(&alt, &truth),
            "truth {truth:?} not among {fit:?}"
        );
    }

    #[test]
    fn more_points_recover_the_generating_curve() {
        let truth = PowerCurve {
            a: 0.3,
            b: 1.2,
            c: 0.4,
        };
        let fit = fit_power_curve("c4", &points(truth, &[0.2, 0.5, 1.0, 2.0, 3.0])).expect("fits");
        assert!(fit.alternate.is_none());
        assert!(same_curve(&fit.curve, &truth), "{fit:?}");
    }

    #[test]
    fn increasing_loss_is_a_named_error() {
        let err = fit_power_curve("wiki", &[(0.2, 0.9), (1.0, 1.0), (3.0, 1.1)])
            .expect_err("not decreasing");
        let msg = err.to_string();
        assert!(
            msg.contains("`wiki`") && msg.contains("does not decrease"),
            "{msg}"
        );
        assert!(msg.contains("y(3)=1.1000"), "{msg}");
    }

    #[test]
    fn bad_points_are_errors_not_panics() {
        assert!(fit_power_curve("d", &[(0.2, 1.1), (1.0, 1.0)]).is_err());
        assert!(fit_power_curve("d", &[(0.2, 1.1), (1.0, 1.0), (1.0, 0.9)]).is_err());
        assert!(fit_power_curve("d", &[(0.2, f64::NAN), (1.0, 1.0), (3.0, 0.9)]).is_err());
        assert!(fit_power_curve("d", &[(-0.2, 1.1), (1.0, 1.0), (3.0, 0.9)]).is_err());
    }

    #[test]
    fn concave_points_fall_back_to_least_squares() {
        // Decreasing but concave: no convex curve passes through all three.
        let fit = fit_power_curve("d", &[(0.2, 1.01), (1.0, 1.0), (3.0, 0.8)]).expect("fits");
        assert!(fit.rms_residual > 1e-6);
        assert!(fit.curve.b > 0.0 && 0.2 + fit.curve.a > 0.0);
    }
}
