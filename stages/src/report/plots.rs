//! The report's plots, each drawn once per backend from the same code: SVG for the HTML page
//! and PNG for anything that cannot show SVG. Text goes through the vendored font
//! ([`crate::font`]), so both backends lay labels out identically.

use std::collections::BTreeMap;

use autoscale_mixture::{DdoReport, Prediction};
use plotters::backend::RGBPixel;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::ReportError;
use crate::font::FAMILY;
use crate::mixture_kinds::{COLORS, padded_log_range, padded_range};

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// The legend of every plot here, boxed on white, at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font(text_style(12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A plot that can be drawn on any plotters backend.
pub(super) trait Figure {
    /// The file stem, `<name>.svg` and `<name>.png`.
    const NAME: &'static str;

    fn size(&self) -> (u32, u32);

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> PlotResult
    where
        DB::ErrorType: 'static;
}

/// One plot in both formats.
#[derive(Debug, Clone)]
pub(super) struct Rendered {
    pub svg: String,
    pub png: Vec<u8>,
}

pub(super) fn render<F: Figure>(figure: &F) -> Result<Rendered, ReportError> {
    let failed = |message: String| ReportError::Plot {
        plot: F::NAME,
        message,
    };
    let (width, height) = figure.size();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        figure.draw(&root).map_err(|e| failed(e.to_string()))?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    {
        let backend =
            BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut pixels, (width, height))
                .map_err(|e| failed(e.to_string()))?;
        let root = backend.into_drawing_area();
        figure.draw(&root).map_err(|e| failed(e.to_string()))?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let png = encode_png(&pixels, width, height)
        .map_err(|e| failed(format!("cannot encode the PNG: {e}")))?;
    Ok(Rendered { svg, png })
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

fn text_style(size: u32) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font()).color(&BLACK)
}

/// Draws a row of `(colour, label)` keys across `area`, for plots whose panels share one.
fn legend_row<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    keys: &[(RGBColor, String)],
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    let (width, height) = area.dim_in_pixel();
    let slot = (width as i32 - 20) / keys.len().max(1) as i32;
    let y = height as i32 / 2;
    let style = text_style(13).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (color, label)) in keys.iter().enumerate() {
        let x = 20 + i as i32 * slot;
        area.draw(&PathElement::new(
            vec![(x, y), (x + 24, y)],
            color.stroke_width(3),
        ))?;
        area.draw(&Circle::new((x + 12, y), 4, color.filled()))?;
        area.draw(&Text::new(label.clone(), (x + 30, y), style.clone()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// fits

/// DDO's per-domain fits, one panel per domain, one colour per proxy scale.
pub(super) struct FitsFigure<'a> {
    /// `(label, report)`, smallest scale first.
    pub scales: &'a [(String, &'a DdoReport)],
}

const FIT_PANEL: (u32, u32) = (330, 260);
const TITLE_HEIGHT: u32 = 40;
const LEGEND_HEIGHT: u32 = 36;

impl FitsFigure<'_> {
    fn domains(&self) -> Vec<String> {
        let mut domains: Vec<String> = Vec::new();
        for (_, report) in self.scales {
            for d in &report.domains {
                if !domains.contains(&d.name) {
                    domains.push(d.name.clone());
                }
            }
        }
        domains
    }

    fn grid(&self) -> (usize, usize) {
        let n = self.domains().len().max(1);
        let cols = n.min(4);
        (n.div_ceil(cols), cols)
    }
}

impl Figure for FitsFigure<'_> {
    const NAME: &'static str = "fits";

    fn size(&self) -> (u32, u32) {
        let (rows, cols) = self.grid();
        (
            cols as u32 * FIT_PANEL.0,
            TITLE_HEIGHT + rows as u32 * FIT_PANEL.1 + LEGEND_HEIGHT,
        )
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> PlotResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let objectives: Vec<String> = self
            .scales
            .iter()
            .map(|(_, r)| r.objective.to_string())
            .collect();
        let body = root.titled(
            &format!(
                "DDO fits per domain (objective: {})",
                objectives.first().cloned().unwrap_or_default()
            ),
            text_style(20),
        )?;
        let (_, height) = body.dim_in_pixel();
        let (grid, legend) = body.split_vertically(height.saturating_sub(LEGEND_HEIGHT));
        let panels = grid.split_evenly(self.grid());
        for (domain, panel) in self.domains().iter().zip(panels.iter()) {
            let fits: Vec<(usize, &autoscale_mixture::DomainResult)> = self
                .scales
                .iter()
                .enumerate()
                .filter_map(|(i, (_, r))| {
                    r.domains.iter().find(|d| d.name == *domain).map(|d| (i, d))
                })
                .collect();
            let x_hi = fits
                .iter()
                .flat_map(|(_, d)| d.points.iter().map(|p| p.multiplier).chain([d.multiplier]))
                .filter(|x| x.is_finite())
                .fold(1.0, f64::max)
                * 1.1;
            let (y_lo, y_hi) = padded_range(fits.iter().flat_map(|(_, d)| {
                d.points
                    .iter()
                    .map(|p| p.ratio)
                    .chain(d.fit.map(|f| f.eval(d.multiplier)))
            }));
            let mut chart = ChartBuilder::on(panel)
                .caption(domain, text_style(15))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(48)
                .build_cartesian_2d(0.0..x_hi, y_lo..y_hi)?;
            chart
                .configure_mesh()
                .x_labels(5)
                .y_labels(5)
                .light_line_style(WHITE)
                .label_style(text_style(11))
                .x_label_formatter(&|x| format!("{x:.1}"))
                .y_label_formatter(&|y| format!("{y:.3}"))
                .draw()?;
            for (i, d) in fits {
                let c = color(i);
                // A flat domain has no fitted curve, only its points.
                let curve: Vec<(f64, f64)> = d.fit.map_or_else(Vec::new, |fit| {
                    (0..=100)
                        .map(|k| x_hi * f64::from(k) / 100.0)
                        .map(|x| (x, fit.eval(x)))
                        .filter(|(_, y)| y.is_finite() && (y_lo..=y_hi).contains(y))
                        .collect()
                });
                chart.draw_series(LineSeries::new(curve, c.stroke_width(2)))?;
                chart.draw_series(
                    d.points
                        .iter()
                        .map(|p| Circle::new((p.multiplier, p.ratio), 4, c.filled())),
                )?;
                let optimum = (
                    d.multiplier,
                    d.fit.map_or(f64::NAN, |f| f.eval(d.multiplier)),
                );
                if optimum.1.is_finite() {
                    chart.draw_series([Cross::new(optimum, 7, c.stroke_width(2))])?;
                }
            }
        }
        let keys: Vec<(RGBColor, String)> = self
            .scales
            .iter()
            .enumerate()
            .map(|(i, (label, _))| (color(i), format!("{label} tokens")))
            .collect();
        legend_row(&legend, &keys)
    }
}

// ---------------------------------------------------------------------------------------------
// weights

/// Each source's weights by domain (grouped bars) and, with a prediction, the predicted
/// weights along AutoScale's fitted path against the total tokens.
pub(super) struct WeightsFigure<'a> {
    pub domains: Vec<String>,
    /// `(label, weights)`, one bar per domain each.
    pub columns: Vec<(String, BTreeMap<String, f64>)>,
    pub prediction: Option<&'a Prediction>,
    /// DDO's optimal weights at each proxy scale `(total tokens, weights)`.
    pub ddo_points: Vec<(f64, BTreeMap<String, f64>)>,
}

const WEIGHTS_PANEL: (u32, u32) = (1000, 460);

impl Figure for WeightsFigure<'_> {
    const NAME: &'static str = "weights";

    fn size(&self) -> (u32, u32) {
        let panels = if self.prediction.is_some() { 2 } else { 1 };
        (WEIGHTS_PANEL.0, WEIGHTS_PANEL.1 * panels)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> PlotResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        match self.prediction {
            Some(prediction) => {
                let (top, bottom) = root.split_vertically(WEIGHTS_PANEL.1);
                self.draw_bars(&top)?;
                self.draw_path(&bottom, prediction)
            }
            None => self.draw_bars(root),
        }
    }
}

impl WeightsFigure<'_> {
    fn draw_bars<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> PlotResult
    where
        DB::ErrorType: 'static,
    {
        let n = self.domains.len();
        let k = self.columns.len().max(1);
        let y_hi = self
            .columns
            .iter()
            .flat_map(|(_, w)| w.values().copied())
            .filter(|w| w.is_finite())
            .fold(0.05, f64::max)
            * 1.3;
        let mut chart = ChartBuilder::on(area)
            .caption("Mixture weights by domain", text_style(20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..y_hi)?;
        let domains = &self.domains;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(n)
            .label_style(text_style(12))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    domains.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.2}"))
            .y_desc("weight")
            .draw()?;
        let width = 0.8 / k as f64;
        for (j, (label, weights)) in self.columns.iter().enumerate() {
            let c = color(j);
            let bars = self.domains.iter().enumerate().filter_map(|(i, d)| {
                let w = *weights.get(d)?;
                let x0 = i as f64 - 0.4 + j as f64 * width;
                Some(Rectangle::new([(x0, 0.0), (x0 + width, w)], c.filled()))
            });
            chart
                .draw_series(bars)?
                .label(label.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    }

    fn draw_path<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        prediction: &Prediction,
    ) -> PlotResult
    where
        DB::ErrorType: 'static,
    {
        // ln N_i(s) = ln N_i(s*) + delta_i (s - s*): AutoScale's fitted path, from the smallest
        // input scale to the target.
        let s_values = prediction.scales.iter().map(|f| f.s).chain([prediction.s]);
        let s_lo = s_values.clone().fold(f64::INFINITY, f64::min);
        let s_hi = s_values.fold(f64::NEG_INFINITY, f64::max);
        let path: Vec<(f64, Vec<f64>)> = (0..=80)
            .map(|k| s_lo + (s_hi - s_lo) * f64::from(k) / 80.0)
            .map(|s| {
                let n: Vec<f64> = prediction
                    .domains
                    .iter()
                    .map(|d| d.tokens * (d.log_slope * (s - prediction.s)).exp())
                    .collect();
                let total: f64 = n.iter().sum();
                (total, n.iter().map(|x| x / total).collect())
            })
            .filter(|(total, w): &(f64, Vec<f64>)| {
                total.is_finite() && *total > 0.0 && w.iter().all(|x| x.is_finite())
            })
            .collect();
        let xs = path
            .iter()
            .map(|(t, _)| *t)
            .chain(self.ddo_points.iter().map(|(t, _)| *t))
            .chain([prediction.total_tokens]);
        let (x_lo, x_hi) = padded_log_range(xs);
        let y_hi = path
            .iter()
            .flat_map(|(_, w)| w.iter().copied())
            .chain(
                self.ddo_points
                    .iter()
                    .flat_map(|(_, w)| w.values().copied()),
            )
            .filter(|w| w.is_finite())
            .fold(0.05, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "Predicted optimal weights against scale (target {:.1e} tokens)",
                    prediction.total_tokens
                ),
                text_style(20),
            )
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_hi)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_labels(12)
            .label_style(text_style(12))
            .x_desc("total training tokens")
            .y_desc("weight")
            .x_label_formatter(&|x| {
                // Labels at 1, 2 and 5 of each decade only; the rest crowd into each other.
                let mantissa = x / 10f64.powf(x.log10().floor());
                let shown = [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .any(|m| (mantissa - m).abs() < 1e-6 * m);
                if shown {
                    format!("{x:.0e}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()?;
        for (i, d) in prediction.domains.iter().enumerate() {
            let c = color(i);
            let line: Vec<(f64, f64)> = path.iter().map(|(t, w)| (*t, w[i])).collect();
            chart
                .draw_series(LineSeries::new(line, c.stroke_width(2)))?
                .label(d.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart.draw_series(self.ddo_points.iter().filter_map(|(total, w)| {
                Some(Circle::new((*total, *w.get(&d.name)?), 4, c.filled()))
            }))?;
            chart.draw_series([TriangleMarker::new(
                (prediction.total_tokens, d.weight),
                7,
                c.filled(),
            )])?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// curves

/// One mixture's validation curves.
pub(super) struct CurveSeries {
    pub label: String,
    /// `(step, mean loss)` per seed.
    pub seeds: Vec<Vec<(u64, f64)>>,
    /// The seed average, when the seeds share steps.
    pub mean: Option<Vec<(u64, f64)>>,
}

/// Validation mean loss against the step, one colour per mixture.
pub(super) struct CurvesFigure {
    pub series: Vec<CurveSeries>,
    /// The reference's name and final (seed-averaged) loss: the speed-up's target.
    pub reference_final: Option<(String, f64)>,
}

impl Figure for CurvesFigure {
    const NAME: &'static str = "curves";

    fn size(&self) -> (u32, u32) {
        (960, 560)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> PlotResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let points = || self.series.iter().flat_map(|s| s.seeds.iter().flatten());
        let x_hi = points().map(|(s, _)| *s).max().unwrap_or(1).max(1) as f64;
        let (y_lo, y_hi) = padded_range(
            points()
                .map(|(_, l)| *l)
                .chain(self.reference_final.iter().map(|(_, l)| *l)),
        );
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Validation mean loss of the target trainings",
                text_style(20),
            )
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_hi * 1.02, y_lo..y_hi)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(245, 245, 245))
            .label_style(text_style(12))
            .x_desc("training step")
            .y_desc("mean validation loss (nats/token)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.3}"))
            .draw()?;
        let as_f64 = |curve: &[(u64, f64)]| -> Vec<(f64, f64)> {
            curve.iter().map(|(s, l)| (*s as f64, *l)).collect()
        };
        for (i, series) in self.series.iter().enumerate() {
            let c = color(i);
            let thin = c.mix(0.35).stroke_width(1);
            for seed in &series.seeds {
                chart.draw_series(LineSeries::new(as_f64(seed), thin))?;
            }
            let main = match &series.mean {
                Some(mean) => as_f64(mean),
                None => series.seeds.first().map(|s| as_f64(s)).unwrap_or_default(),
            };
            chart
                .draw_series(LineSeries::new(main, c.stroke_width(2)))?
                .label(series.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
        if let Some((name, loss)) = &self.reference_final {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, *loss), (x_hi * 1.02, *loss)],
                    6,
                    4,
                    BLACK.mix(0.6).stroke_width(1),
                ))?
                .label(format!("{name}'s final loss {loss:.4}"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6)));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    }
}
