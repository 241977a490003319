use super::*;

use crate::mixture_kinds::{DdoKind, DdoPlanKind, MixtureKind, PredictKind};

use crate::kind_harness::Harness;

/// A target run's directory holding `eval`, as `runs` member `child`.
fn eval_dir(h: &Harness, child: &str, eval: &Value) -> PathBuf {
    let dir = h.dir(&format!("runs/{child}"));
    std::fs::write(dir.join("eval.json"), eval.to_string()).expect("write eval.json");
    dir
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

fn runs_input(runs: BTreeMap<String, PathBuf>) -> BTreeMap<String, InputPath> {
    BTreeMap::from([("runs".to_owned(), InputPath::Many(runs))])
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// `eval.json` as the libtorch trainer writes it (`evaluate::eval_json`, `curve_point`):
/// final per-domain metrics, and a curve of `(step, mean loss)` with per-domain losses.
fn trainer_eval(domains: &[(&str, f64)], curve: &[(u64, f64)]) -> Value {
    let n = domains.len() as f64;
    let metrics: Map<String, Value> = domains
        .iter()
        .map(|(d, l)| {
            let m = json!({"loss": l, "ppl": l.exp(), "bpb": l / 2f64.ln(), "tokens": 4096});
            ((*d).to_owned(), m)
        })
        .collect();
    let points: Vec<Value> = curve
        .iter()
        .map(|(step, loss)| {
            let per_domain: Map<String, Value> = domains
                .iter()
                .map(|(d, _)| ((*d).to_owned(), json!(loss)))
                .collect();
            json!({
                "step": step, "tokens": step * 2048, "train_loss": null,
                "mean_loss": loss, "mean_ppl": loss.exp(), "worst_ppl": loss.exp(),
                "domains": per_domain,
            })
        })
        .collect();
    json!({
        "domains": metrics,
        "mean_loss": domains.iter().map(|(_, l)| l).sum::<f64>() / n,
        "mean_ppl": domains.iter().map(|(_, l)| l.exp()).sum::<f64>() / n,
        "worst_ppl": domains.iter().map(|(_, l)| l.exp()).fold(0.0, f64::max),
        "curve": points,
        "train": {"steps": curve.last().map_or(0, |(s, _)| *s), "tokens": 1_000_000},
    })
}

/// `eval.json` as examples/proxy/ngram_proxy.py writes it: no curve, extra fields everywhere.
fn ngram_eval(domains: &[(&str, f64)]) -> Value {
    let metrics: Map<String, Value> = domains
        .iter()
        .map(|(d, l)| {
            let m = json!({
                "loss": l, "ppl": l.exp(), "bpb": 1.7, "val_tokens": 5000,
                "val_bytes": 5000, "val_docs": 12, "train_docs": 100,
            });
            ((*d).to_owned(), m)
        })
        .collect();
    let n = domains.len() as f64;
    json!({
        "domains": metrics,
        "mean_loss": domains.iter().map(|(_, l)| l).sum::<f64>() / n,
        "mean_ppl": domains.iter().map(|(_, l)| l.exp()).sum::<f64>() / n,
        "worst_ppl": domains.iter().map(|(_, l)| l.exp()).fold(0.0, f64::max),
        "train": {"tokens": {"books": 1000, "code": 1000}, "epochs": {"books": 0.5}, "seconds": 0.1},
        "eval_seconds": 0.2,
        "total_seconds": 0.3,
        "model": {"kind": "interpolated Kneser-Ney n-gram", "order": 4, "ngrams": 1234, "discounts": [0.5]},
        "config": {"seed": 0, "val_docs": 50, "val_fraction": 0.1},
    })
}

/// Reference `predict` (2 seeds) and baselines `uniform` (2 seeds, reaches the reference's
/// final loss at step 150) and `natural` (1 seed, never reaches it), trainer format.
fn two_seed_runs(h: &Harness) -> BTreeMap<String, PathBuf> {
    // Seeds straddle the averaged curve by +-0.1, so the averages are the round numbers.
    let reference = |off: f64| [(0, 4.0 + off), (50, 3.0 + off), (100, 2.0 + off)];
    let uniform = |off: f64| [(0, 4.0 + off), (100, 2.5 + off), (200, 1.5 + off)];
    let mut runs = BTreeMap::new();
    for (child, domains, curve) in [
        (
            "target[predict,0]",
            [("books", 2.0), ("code", 3.0)],
            reference(0.1),
        ),
        (
            "target[predict,1]",
            [("books", 2.2), ("code", 3.2)],
            reference(-0.1),
        ),
        (
            "target[uniform,0]",
            [("books", 2.3), ("code", 3.1)],
            uniform(0.1),
        ),
        (
            "target[uniform,1]",
            [("books", 2.5), ("code", 3.3)],
            uniform(-0.1),
        ),
    ] {
        runs.insert(
            child.to_owned(),
            eval_dir(h, child, &trainer_eval(&domains, &curve)),
        );
    }
    let natural = trainer_eval(
        &[("books", 2.6), ("code", 3.4)],
        &[(0, 4.0), (100, 3.0), (200, 2.5)],
    );
    runs.insert(
        "target[natural,0]".into(),
        eval_dir(h, "target[natural,0]", &natural),
    );
    runs
}

#[test]
fn two_mixtures_two_seeds_give_the_seed_means_and_sds() {
    let h = Harness::new();
    let (out, summary) = h
        .run(
            &ReportKind,
            "report",
            json!({}),
            runs_input(two_seed_runs(&h)),
        )
        .expect("report");
    let results = read(&out.join("results.json"));
    let predict = &results["mixtures"]["predict"];
    let sd = (2.0f64 * 0.1 * 0.1).sqrt(); // two seeds 0.2 apart
    assert_eq!(predict["name"], "AutoScale");
    assert_eq!(predict["seeds"], json!(["0", "1"]));
    assert!(close(
        predict["mean_loss"]["mean"].as_f64().expect("mean"),
        2.6
    ));
    assert!(close(predict["mean_loss"]["sd"].as_f64().expect("sd"), sd));
    assert!(close(
        predict["domain_loss"]["books"]["mean"]
            .as_f64()
            .expect("books"),
        2.1
    ));
    assert!(close(
        predict["domain_loss"]["code"]["sd"]
            .as_f64()
            .expect("code sd"),
        sd
    ));
    let uniform = &results["mixtures"]["uniform"];
    assert!(close(
        uniform["mean_loss"]["mean"].as_f64().expect("mean"),
        2.8
    ));
    // Mean ppl is the mean over seeds of each run's mean over domains of exp(loss).
    let ppl = |a: f64, b: f64| (a.exp() + b.exp()) / 2.0;
    let want = (ppl(2.0, 3.0) + ppl(2.2, 3.2)) / 2.0;
    assert!(close(
        predict["mean_ppl"]["mean"].as_f64().expect("ppl"),
        want
    ));
    // One seed has no sd, rather than a zero one.
    assert!(results["mixtures"]["natural"]["mean_loss"]["sd"].is_null());
    assert!(close(
        summary["mean_loss"]["uniform"].as_f64().expect("summary"),
        2.8
    ));

    let comparison = &results["comparisons"]["uniform"];
    assert!(close(
        comparison["mean_loss_diff"].as_f64().expect("diff"),
        -0.2
    ));
    assert_eq!(comparison["within_seed_noise"], false);
    // Welch: t = -0.2 / sqrt(0.1414²/2 · 2) = -√2, df = 2; Student's t with 2 df has the closed
    // form F(t) = 1/2 + t / (2 sqrt(2 + t²)), so p = 2 (1 - F(√2)) = 1 - √2/2.
    let welch = &comparison["welch"];
    assert!((welch["t"].as_f64().expect("t") + 2f64.sqrt()).abs() < 1e-9);
    assert!((welch["df"].as_f64().expect("df") - 2.0).abs() < 1e-9);
    let p = welch["p"].as_f64().expect("p");
    assert!((p - (1.0 - 2f64.sqrt() / 2.0)).abs() < 1e-6, "{p}");
    // Natural has one seed: no test, and the verdict says so rather than inventing one.
    assert!(results["comparisons"]["natural"]["welch"].is_null());
    let verdict = results["verdict"].as_str().expect("verdict");
    assert!(
        verdict.contains("not distinguishable from uniform"),
        "{verdict}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("**Verdict.**"), "{md}");
    assert!(
        md.contains("## Validation loss at the target scale"),
        "{md}"
    );
    assert!(md.contains("| AutoScale | 2 | 2.6000 ± 0.1414 |"), "{md}");
    assert!(!md.contains("does not beat"), "{md}");
}

#[test]
fn the_speedup_is_read_off_the_baselines_curve_by_interpolation() {
    let h = Harness::new();
    let (out, _) = h
        .run(
            &ReportKind,
            "report",
            json!({}),
            runs_input(two_seed_runs(&h)),
        )
        .expect("report");
    let results = read(&out.join("results.json"));
    // AutoScale ends at 2.0 at step 100; uniform crosses 2.0 halfway from step 100 to 200.
    let uniform = &results["speedups"]["uniform"];
    assert_eq!(uniform["status"], "reached", "{uniform}");
    assert!(close(
        uniform["reference_loss"].as_f64().expect("loss"),
        2.0
    ));
    assert_eq!(uniform["reference_steps"], 100);
    assert!(close(
        uniform["baseline_steps"].as_f64().expect("steps"),
        150.0
    ));
    assert!(close(uniform["speedup"].as_f64().expect("speedup"), 1.5));
    // natural ends at 2.5 at step 200: never reached, so only a lower bound.
    let natural = &results["speedups"]["natural"];
    assert_eq!(natural["status"], "not_reached", "{natural}");
    assert_eq!(natural["baseline_steps_above"], 200);
    assert!(close(
        natural["speedup_above"].as_f64().expect("bound"),
        2.0
    ));
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("| uniform | 150 | 1.50x |"), "{md}");
    assert!(
        md.contains("| natural | not reached within 200 | > 2.00x |"),
        "{md}"
    );
}

#[test]
fn steps_to_reach_interpolates_and_bounds() {
    let curve = [(0, 4.0), (100, 2.5), (200, 1.5)];
    assert_eq!(steps_to_reach(&curve, 2.0), Ok((150.0, false)));
    assert_eq!(steps_to_reach(&curve, 2.5), Ok((100.0, false)));
    // Already below at the first evaluation: an upper bound.
    assert_eq!(steps_to_reach(&curve, 5.0), Ok((0.0, true)));
    assert_eq!(steps_to_reach(&curve, 1.0), Err(200));
}

#[test]
fn seed_curves_on_different_steps_average_over_the_shared_ones() {
    let a = vec![(0, 4.0), (50, 3.0), (100, 2.0)];
    let b = vec![(0, 3.0), (100, 1.0)];
    assert_eq!(
        average_curve(&[a.clone(), b]),
        Some(vec![(0, 3.5), (100, 1.5)])
    );
    assert_eq!(average_curve(&[a, Vec::new()]), None);
}

#[test]
fn ngram_runs_without_curves_report_no_speedup_instead_of_inventing_one() {
    let h = Harness::new();
    let mut runs = BTreeMap::new();
    for (child, books, code) in [
        ("target[predict,0]", 1.9, 2.4),
        ("target[predict,1]", 1.95, 2.45),
        ("target[uniform,0]", 2.1, 2.3),
        ("target[uniform,1]", 2.15, 2.35),
    ] {
        let eval = ngram_eval(&[("books", books), ("code", code)]);
        runs.insert(child.to_owned(), eval_dir(&h, child, &eval));
    }
    let (out, _) = h
        .run(&ReportKind, "report", json!({}), runs_input(runs))
        .expect("report");
    let results = read(&out.join("results.json"));
    assert_eq!(results["speedups"]["uniform"]["status"], "unavailable");
    assert!(close(
        results["mixtures"]["uniform"]["mean_loss"]["mean"]
            .as_f64()
            .expect("mean"),
        (2.2 + 2.25) / 2.0
    ));
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("## Speed-up\n\nNot available: "), "{md}");
    assert!(md.contains("no validation curve"), "{md}");
    assert!(!md.contains("x |"), "no speed-up factor is printed: {md}");
    // No curves, no context: no plots at all, and the report says none.
    assert_eq!(results["plots"], json!([]));
    assert!(!out.join("curves.png").exists());
    // AutoScale 2.175 against uniform 2.225, seed sd 0.035: better, beyond the noise.
    assert!(md.contains("vs uniform: mean loss -0.0500 nats"), "{md}");
    assert!(
        !md.contains("does not beat") && !md.contains("by less than"),
        "{md}"
    );
}

#[test]
fn a_reference_that_loses_to_uniform_is_said_plainly() {
    let h = Harness::new();
    let mut runs = BTreeMap::new();
    for (child, loss) in [("target[predict]", 2.5), ("target[uniform]", 2.0)] {
        let eval = ngram_eval(&[("books", loss), ("code", loss)]);
        runs.insert(child.to_owned(), eval_dir(&h, child, &eval));
    }
    let (out, _) = h
        .run(&ReportKind, "report", json!({}), runs_input(runs))
        .expect("report");
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(
        md.contains("**AutoScale does not beat uniform here**: its mean validation loss is 2.5000 against 2.0000."),
        "{md}"
    );
    assert!(
        md.contains("one seed, so there is no estimate of the seed noise"),
        "{md}"
    );
    let results = read(&out.join("results.json"));
    assert_eq!(results["mixtures"]["predict"]["seeds"], json!(["-"]));
}

#[test]
fn a_run_id_without_mixture_and_seed_is_named_in_the_error() {
    let h = Harness::new();
    let mut runs = two_seed_runs(&h);
    let eval = ngram_eval(&[("books", 2.0), ("code", 3.0)]);
    runs.insert("target_uniform_2".into(), eval_dir(&h, "odd", &eval));
    let Err(StageError::Failed { message, hint }) =
        h.run(&ReportKind, "report", json!({}), runs_input(runs))
    else {
        panic!("a bad run id must fail the report")
    };
    assert!(message.contains("`target_uniform_2`"), "{message}");
    assert!(hint.is_some_and(|h| h.contains("<stage>[<mixture>,<seed>]")));
}

#[test]
fn runs_on_different_domains_and_a_missing_reference_are_errors() {
    let h = Harness::new();
    let mut runs = BTreeMap::new();
    runs.insert(
        "t[predict,0]".to_owned(),
        eval_dir(&h, "a", &ngram_eval(&[("books", 2.0), ("code", 3.0)])),
    );
    runs.insert(
        "t[uniform,0]".to_owned(),
        eval_dir(&h, "b", &ngram_eval(&[("books", 2.0)])),
    );
    let err = h
        .run(&ReportKind, "report", json!({}), runs_input(runs.clone()))
        .expect_err("domains differ");
    assert!(
        err.to_string()
            .contains("run `t[uniform,0]` is evaluated on [books]"),
        "{err}"
    );

    runs.remove("t[uniform,0]");
    let err = h
        .run(
            &ReportKind,
            "report",
            json!({"reference": "ddo_large"}),
            runs_input(runs),
        )
        .expect_err("no reference runs");
    assert!(err.to_string().contains("`ddo_large` has no runs"), "{err}");
}

#[test]
fn names_must_map_to_strings() {
    let err = ReportKind
        .check(&match json!({"names": {"predict": 3}}) {
            Value::Object(m) => m,
            _ => Map::new(),
        })
        .expect_err("a number is not a name");
    assert!(err.contains("`names.predict` must be a string"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// With the whole context: DDO at two scales, the prediction and two baselines.

/// Per-domain shifted power laws `(x + a)^(-b)`; DDO recovers them exactly.
const AB: [(f64, f64); 2] = [(2.0, 1.0), (0.5, 3.0)];
const DOMAINS: [&str; 2] = ["books", "code"];

/// Runs `ddo_plan` and `ddo` at `base_tokens` on proxies that follow [`AB`].
fn ddo_at(h: &Harness, id: &str, base_tokens: f64, scale_effect: f64) -> PathBuf {
    let (plan_dir, _) = h
        .run(
            &DdoPlanKind,
            &format!("plan_{id}"),
            json!({"domains": DOMAINS, "base_tokens": base_tokens}),
            BTreeMap::new(),
        )
        .expect("plan");
    let fanout = read(&plan_dir.join("fanout.json"));
    let mut proxies = BTreeMap::new();
    for child in fanout["children"].as_array().expect("children") {
        let run = child["id"].as_str().expect("id");
        let n = DOMAINS
            .map(|d| child["params"]["tokens"][d].as_f64().expect("tokens") / base_tokens * 2.0);
        let ratio = 1.0
            + n.iter()
                .zip(AB)
                .enumerate()
                .map(|(i, (x, (a, b)))| {
                    let b = if i == 0 { b * scale_effect } else { b };
                    (x + a).powf(-b) - (1.0 + a).powf(-b)
                })
                .sum::<f64>();
        let l = 20.0 * ratio;
        let domains: Map<String, Value> = DOMAINS
            .iter()
            .map(|d| ((*d).to_owned(), json!({"ppl": l, "loss": l.ln()})))
            .collect();
        let dir = h.dir(&format!("proxy_{id}/{run}"));
        std::fs::write(
            dir.join("eval.json"),
            json!({"domains": domains}).to_string(),
        )
        .expect("write");
        proxies.insert(format!("proxy_{id}[{run}]"), dir);
    }
    let (dir, _) = h
        .run(
            &DdoKind,
            id,
            json!({}),
            BTreeMap::from([
                ("plan".to_owned(), InputPath::One(plan_dir)),
                ("runs".to_owned(), InputPath::Many(proxies)),
            ]),
        )
        .expect("ddo");
    dir
}

#[test]
fn a_full_report_draws_fits_weights_and_curves_as_svg_and_png() {
    let h = Harness::new();
    let small = ddo_at(&h, "ddo_small", 1e5, 1.0);
    let large = ddo_at(&h, "ddo_large", 3e5, 1.2);
    let (predict, _) = h
        .run(
            &PredictKind,
            "predict",
            json!({"target_tokens": 1.5e6}),
            BTreeMap::from([
                ("small".to_owned(), InputPath::One(small.clone())),
                ("large".to_owned(), InputPath::One(large.clone())),
            ]),
        )
        .expect("predict");
    let (uniform, _) = h
        .run(
            &MixtureKind,
            "uniform",
            json!({"method": "uniform", "domains": DOMAINS}),
            BTreeMap::new(),
        )
        .expect("uniform");
    let script = h.dir("scripts").join("report.py");
    std::fs::write(&script, "print('not weights')").expect("write script");
    let mut inputs = runs_input(two_seed_runs(&h));
    for (name, path) in [
        ("ddo_small", small),
        ("ddo_large", large),
        ("predict", predict),
        ("uniform", uniform),
        ("script", script),
    ] {
        inputs.insert(name.to_owned(), InputPath::One(path));
    }
    let (out, summary) = h
        .run(
            &ReportKind,
            "report",
            json!({"title": "Demo", "names": {"natural": "natural (bytes)"}}),
            inputs,
        )
        .expect("report");
    assert_eq!(summary["plots"], json!(["fits", "weights", "curves"]));
    for plot in ["fits", "weights", "curves"] {
        let png = std::fs::read(out.join(format!("{plot}.png"))).expect("png");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{plot}.png is a PNG");
        assert!(
            png.len() > 5_000,
            "{plot}.png has content: {} bytes",
            png.len()
        );
        let svg = std::fs::read_to_string(out.join(format!("{plot}.svg"))).expect("svg");
        assert!(
            svg.contains("<svg") && svg.contains("<text"),
            "{plot}.svg has text"
        );
        assert!(
            svg.len() > 5_000,
            "{plot}.svg has content: {} bytes",
            svg.len()
        );
    }
    // The PNG decodes to the figure's size and is drawn on, not blank white.
    let png = std::fs::read(out.join("curves.png")).expect("png");
    let mut reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .expect("decode");
    let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut pixels).expect("frame");
    assert_eq!((info.width, info.height), (960, 560));
    let drawn = pixels
        .chunks(3)
        .filter(|p| p.iter().any(|c| *c < 200))
        .count();
    assert!(drawn * 100 > pixels.len() / 3, "{drawn} drawn pixels");
    let results = read(&out.join("results.json"));
    let auto: f64 = results["weights"]["AutoScale"]
        .as_object()
        .expect("AutoScale weights")
        .values()
        .filter_map(Value::as_f64)
        .sum();
    assert!(close(auto, 1.0), "{auto}");
    assert!(results["weights"]["DDO (smaller proxy scale)"].is_object());
    assert!(close(
        results["target_tokens"].as_f64().expect("target"),
        1.5e6
    ));

    let html = std::fs::read_to_string(out.join("report.html")).expect("html");
    assert!(html.contains("<title>Demo</title>"));
    assert_eq!(html.matches("<svg").count(), 3, "the plots are inline");
    assert!(!html.contains("src="), "nothing external");
    let md = std::fs::read_to_string(out.join("report.md")).expect("md");
    assert!(md.contains("## Mixture weights"), "{md}");
    assert!(md.contains("| domain | DDO (smaller proxy scale) @ 1.0e5 | DDO (larger proxy scale) @ 3.0e5 | AutoScale @ 1.5e6 | uniform |"), "{md}");
    assert!(md.contains("## DDO at each proxy scale"), "{md}");
    assert!(md.contains("natural (bytes)"), "{md}");
    assert!(
        md.contains("input `script`:"),
        "the ignored input is noted: {md}"
    );
    assert!(md.contains("![curves](curves.svg)"), "{md}");
}
