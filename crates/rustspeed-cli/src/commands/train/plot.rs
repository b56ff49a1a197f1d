//! `OUT/loss.png`: the train loss per step and the eval loss at each evaluation.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Registers DejaVu Sans (embedded: no system font lookup, no fontconfig) as plotters'
/// "sans-serif".
fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is valid TrueType; registration can only fail on a malformed file.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draws the curves (x: optimizer step) into a PNG at `path`.
pub fn write_loss_plot(
    path: &Path,
    title: &str,
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
) -> anyhow::Result<()> {
    fonts();
    let all = train.iter().chain(eval).filter(|(_, y)| y.is_finite());
    let (mut x_max, mut y_min, mut y_max) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()?;
        let finite = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
            pts.iter().copied().filter(|(_, y)| y.is_finite()).collect()
        };
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        chart
            .draw_series(LineSeries::new(finite(train), blue.stroke_width(2)))?
            .label("train loss")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue));
        if !eval.is_empty() {
            let pts = finite(eval);
            chart.draw_series(LineSeries::new(pts.clone(), orange.stroke_width(2)))?;
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, orange.filled())))?
                .label("eval loss")
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, orange.filled()));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_both_curves() {
        let path = std::env::temp_dir().join(format!("rustspeed-plot-{}.png", std::process::id()));
        let train: Vec<(f64, f64)> = (1..=50)
            .map(|s| (s as f64, 5.0 / (s as f64).sqrt()))
            .collect();
        let eval = [(25.0, 1.2), (50.0, 0.9)];
        write_loss_plot(&path, "test run", &train, &eval).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5_000, "a real image, not an empty canvas");
        std::fs::remove_file(&path).unwrap();
        // Nothing finite to draw still gives an image, not an error.
        write_loss_plot(&path, "empty", &[(1.0, f64::NAN)], &[]).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
