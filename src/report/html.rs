//! `report.html`: one self-contained page a person can read at a glance. Plots are drawn with
//! `plotters` as SVG (its built-in text metrics, no system fonts) and inlined as base64 data
//! URIs, like the example images (PNG); the paper-style tables are `report.md` rendered by
//! `pulldown-cmark`. Nothing is fetched from anywhere.
//!
//! Figures: training loss and learning rate per step; hit@k bars for the softmax baseline, DeViSE
//! on seen classes and zero-shot (unseen only, seen + unseen) with chance; hp@k curves (with
//! `eval.hierarchy`); per-class zero-shot hit@1 / hit@5; example unseen images with their top-5
//! labels.
use crate::report::results::{FlatHits, HpAtK, StageEval, HIT_KS};
use anyhow::{anyhow, Result};
use base64::Engine;
use plotters::prelude::*;
use std::fmt::Write;

const WIDTH: u32 = 720;
const HEIGHT: u32 = 320;
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

/// The page. `name_of` gives a label's display name.
pub fn html(
    title: &str,
    markdown: &str,
    evals: &[StageEval],
    metrics: &[serde_json::Value],
    name_of: &dyn Fn(&str) -> String,
) -> Result<String> {
    let mut body = String::new();
    let _ = writeln!(body, "<h1>{}</h1>", escape(title));
    let mut figure = |caption: &str, svg: Option<String>| {
        if let Some(svg) = svg {
            let b64 = base64::engine::general_purpose::STANDARD.encode(svg);
            let _ = writeln!(
                body,
                "<figure><img alt=\"{0}\" src=\"data:image/svg+xml;base64,{b64}\"><figcaption>{0}</figcaption></figure>",
                escape(caption)
            );
        }
    };
    figure(
        "Training loss per logged step",
        curve(metrics, "train/loss", "loss")?,
    );
    figure(
        "Learning rate",
        curve(metrics, "train/lr", "learning rate")?,
    );
    let bars = bar_rows(evals);
    figure(
        "Flat hit@k (%): softmax baseline, DeViSE on seen classes, zero-shot; grey: chance",
        hit_bars(&bars)?,
    );
    figure(
        "Hierarchical precision@k (paper A.3); dashed: chance",
        hp_curves(&bars)?,
    );
    if let Some((stage, per_class)) = evals.iter().rev().find_map(|e| {
        e.rows
            .get("zero_shot/devise_0")
            .filter(|r| !r.per_class.is_empty())
            .map(|r| (e.stage.name(), r))
    }) {
        figure(
            &format!("Zero-shot DeViSE-0 per unseen class after {stage}: hit@1 (blue) and hit@5 (orange)"),
            per_class_bars(per_class, name_of)?,
        );
    }
    if let Some(e) = evals.iter().rev().find(|e| !e.examples.is_empty()) {
        let _ = writeln!(
            body,
            "<h2>Unseen images after {}: DeViSE-0 top 5</h2><div class=\"examples\">",
            escape(e.stage.name())
        );
        for ex in &e.examples {
            let _ = write!(
                body,
                "<figure class=\"example\"><img alt=\"{0}\" src=\"data:image/png;base64,{1}\"><figcaption><b>{0}</b><ol>",
                escape(&name_of(&ex.wnid)),
                ex.png_base64
            );
            for (wnid, score) in &ex.top {
                let mark = if wnid == &ex.wnid {
                    " class=\"hit\""
                } else {
                    ""
                };
                let _ = write!(
                    body,
                    "<li{mark}>{} <small>{score:.3}</small></li>",
                    escape(&name_of(wnid))
                );
            }
            let _ = writeln!(body, "</ol></figcaption></figure>");
        }
        let _ = writeln!(body, "</div>");
    }
    let mut tables = String::new();
    // Without report.md's own title (the page has one).
    let markdown: String = markdown
        .lines()
        .skip_while(|l| l.starts_with("# ") || l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let parser = pulldown_cmark::Parser::new_ext(&markdown, pulldown_cmark::Options::ENABLE_TABLES);
    pulldown_cmark::html::push_html(&mut tables, parser);
    let _ = writeln!(body, "<h2>Tables</h2>{tables}");
    Ok(format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title><style>\
         body{{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}}\
         figure{{margin:1em 0}} table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}\
         .examples{{display:flex;flex-wrap:wrap;gap:1em}} .example img{{width:128px;image-rendering:pixelated}}\
         .example{{width:190px}} .hit{{color:#2a2;font-weight:bold}} ol{{padding-left:1.2em;margin:0}}\
         </style></head><body>\n{body}</body></html>\n",
        escape(title)
    ))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a report plot: {e:?}")
}

/// `(step, value)` of a metric as a line plot; None without data.
fn curve(metrics: &[serde_json::Value], key: &str, y_desc: &str) -> Result<Option<String>> {
    let points: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| Some((m["step"].as_f64()?, m[key].as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    if points.len() < 2 {
        return Ok(None);
    }
    let (x0, x1) = (points[0].0, points.last().unwrap().0.max(points[0].0 + 1.0));
    let y1 = points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let y0 = points.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(0.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..(y1 * 1.05).max(y0 + 1e-9))
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_desc)
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(LineSeries::new(points, &COLOURS[0]))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(Some(svg))
}

/// The rows the bar and hp plots show: the softmax baseline, then the last devise-head
/// evaluation's seen and zero-shot rows.
fn bar_rows(evals: &[StageEval]) -> Vec<(String, &FlatHits)> {
    let mut rows = Vec::new();
    if let Some(e) = evals
        .iter()
        .rev()
        .find(|e| e.rows.contains_key("seen/softmax"))
    {
        rows.push((
            "softmax baseline (seen)".to_string(),
            &e.rows["seen/softmax"],
        ));
    }
    if let Some(e) = evals
        .iter()
        .rev()
        .find(|e| e.rows.contains_key("seen/devise"))
    {
        for (key, label) in [
            ("seen/devise", "DeViSE (seen)"),
            ("zero_shot/devise_0", "DeViSE-0 (zero-shot)"),
            (
                "zero_shot/devise_plus_seen",
                "DeViSE, seen + unseen (zero-shot)",
            ),
        ] {
            if let Some(r) = e.rows.get(key) {
                rows.push((format!("{label}, {}", e.stage), r));
            }
        }
    }
    rows
}

fn hit_bars(rows: &[(String, &FlatHits)]) -> Result<Option<String>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let groups = HIT_KS.len();
    let per = rows.len() + 1; // + chance of the first zero-shot row (or the first row)
    let chance = rows
        .iter()
        .find(|(n, _)| n.contains("zero-shot"))
        .unwrap_or(&rows[0])
        .1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT + 60)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..groups as f64, 0f64..100f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|_| String::new())
            .y_desc("%")
            .draw()
            .map_err(plot_error)?;
        // Group names under the axis, placed in pixels (plotters picks its own numeric ticks).
        for (g, k) in HIT_KS.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(g as f64 + 0.4, 0.0));
            root.draw(&Text::new(
                format!("hit@{k}"),
                (px - 14, py + 8),
                ("sans-serif", 14),
            ))
            .map_err(plot_error)?;
        }
        let width = 0.8 / per as f64;
        for (r, (name, hits)) in rows.iter().enumerate() {
            let colour = COLOURS[r % (COLOURS.len() - 1)];
            chart
                .draw_series(HIT_KS.iter().enumerate().map(|(g, k)| {
                    let x = g as f64 + 0.1 + r as f64 * width;
                    Rectangle::new(
                        [(x, 0.0), (x + width, 100.0 * hits.hit_at_k[k])],
                        colour.filled(),
                    )
                }))
                .map_err(plot_error)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
        let grey = COLOURS[COLOURS.len() - 1];
        chart
            .draw_series(HIT_KS.iter().enumerate().map(|(g, k)| {
                let x = g as f64 + 0.1 + rows.len() as f64 * width;
                Rectangle::new(
                    [(x, 0.0), (x + width, 100.0 * chance.chance_at_k[k])],
                    grey.filled(),
                )
            }))
            .map_err(plot_error)?
            .label("chance (zero-shot)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], grey.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(Some(svg))
}

fn hp_curves(rows: &[(String, &FlatHits)]) -> Result<Option<String>> {
    let rows: Vec<(&String, &HpAtK)> = rows
        .iter()
        .filter_map(|(n, h)| Some((n, h.hp.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(1f64..20f64, 0f64..1f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("k")
            .y_desc("hp@k")
            .draw()
            .map_err(plot_error)?;
        for (r, (name, hp)) in rows.iter().enumerate() {
            let colour = COLOURS[r % (COLOURS.len() - 1)];
            let points: Vec<(f64, f64)> = hp.hp_at_k.iter().map(|(&k, &v)| (k as f64, v)).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                .map_err(plot_error)?
                .label((*name).clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], colour));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(plot_error)?;
            let chance: Vec<(f64, f64)> = hp
                .chance_hp_at_k
                .iter()
                .map(|(&k, &v)| (k as f64, v))
                .collect();
            chart
                .draw_series(DashedLineSeries::new(chance, 4, 4, colour.into()))
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(Some(svg))
}

fn per_class_bars(row: &FlatHits, name_of: &dyn Fn(&str) -> String) -> Result<Option<String>> {
    let classes = &row.per_class;
    if classes.is_empty() {
        return Ok(None);
    }
    let n = classes.len();
    let names: Vec<String> = classes
        .iter()
        .map(|c| {
            let name = name_of(&c.wnid);
            name.chars().take(24).collect()
        })
        .collect();
    let height = (40 + 18 * n as u32).max(120);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(170)
            .build_cartesian_2d(0f64..100f64, 0f64..n as f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_label_formatter(&|_| String::new())
            .x_desc("% of the class's images")
            .draw()
            .map_err(plot_error)?;
        // Class names left of the bars, placed in pixels.
        for (i, name) in names.iter().enumerate() {
            let (_, py) = chart.backend_coord(&(0.0, (n - 1 - i) as f64 + 0.5));
            root.draw(&Text::new(name.clone(), (12, py - 7), ("sans-serif", 13)))
                .map_err(plot_error)?;
        }
        for (series, colour) in [(0usize, COLOURS[0]), (1, COLOURS[1])] {
            chart
                .draw_series(classes.iter().enumerate().map(|(i, c)| {
                    let y = (n - 1 - i) as f64 + 0.1 + 0.4 * series as f64;
                    let v = if series == 0 { c.hit_at_1 } else { c.hit_at_5 };
                    Rectangle::new([(0.0, y), (100.0 * v, y + 0.38)], colour.filled())
                }))
                .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(Some(svg))
}
