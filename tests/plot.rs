//! SVG loss curves: well-formed, one line per series, nice ticks, robust to empty and NaN input.

use lqa::train::plot::{loss_curve_svg, smooth, write_loss_curve, Series, PALETTE};

/// A minimal well-formedness check: every tag is closed in order, attributes are quoted, and
/// there is exactly one root `<svg>` element.
fn assert_well_formed(svg: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    let mut roots = 0;
    while let Some(i) = rest.find('<') {
        let text = &rest[..i];
        assert!(!text.contains('>'), "stray '>' in text {text:?}");
        let end = rest[i..].find('>').expect("unclosed tag") + i;
        let tag = &rest[i + 1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
            continue;
        }
        let self_closing = tag.ends_with('/');
        let name: String = tag
            .trim_end_matches('/')
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        if stack.is_empty() {
            roots += 1;
            assert_eq!(name, "svg");
        }
        if !self_closing {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(roots, 1);
    assert!(rest.trim().is_empty());
}

#[test]
fn svg_has_one_polyline_per_series_ticks_and_legend() {
    let train: Vec<(f64, f64)> = (0..200)
        .map(|i| {
            (
                i as f64,
                3.0 * (-(i as f64) / 60.0).exp() + 0.4 + 0.1 * ((i * 7) % 5) as f64,
            )
        })
        .collect();
    let eval: Vec<(f64, f64)> = (0..=4)
        .map(|i| (i as f64 * 50.0, 3.0 - 0.5 * i as f64))
        .collect();
    let series = [
        Series::new("train (smoothed)", smooth(&train, 10), PALETTE[0]),
        Series::new("eval <held-out> & co", eval, PALETTE[1]),
        Series::new("nothing yet", vec![], PALETTE[2]),
    ];
    let svg = loss_curve_svg(&series, "Decoder loss", "step", "loss");
    assert_well_formed(&svg);
    assert!(svg.starts_with("<svg"));
    assert_eq!(
        svg.matches("<polyline").count(),
        2,
        "one per non-empty series"
    );
    assert!(svg.contains("Decoder loss") && svg.contains(">step<") && svg.contains(">loss<"));
    assert!(
        svg.contains("eval &lt;held-out&gt; &amp; co"),
        "text is escaped"
    );
    assert!(
        !svg.contains("nothing yet"),
        "empty series are not in the legend"
    );
    // x ticks at multiples of 50 (0..200 with about 6 ticks), y ticks at the integers 0..4
    for t in ["0", "50", "100", "150", "200"] {
        assert!(svg.contains(&format!(">{t}</text>")), "x tick {t}");
    }
    for t in ["1", "2", "3", "4"] {
        assert!(svg.contains(&format!(">{t}</text>")), "y tick {t}");
    }
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
}

#[test]
fn svg_of_empty_and_degenerate_input_does_not_panic() {
    for series in [
        vec![],
        vec![Series::new("empty", vec![], PALETTE[0])],
        vec![Series::new(
            "nan",
            vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)],
            PALETTE[0],
        )],
    ] {
        let svg = loss_curve_svg(&series, "", "", "");
        assert_well_formed(&svg);
        assert!(svg.contains("no data"));
        assert_eq!(svg.matches("<polyline").count(), 0);
    }
    // one point, a flat line, NaNs among points, huge and tiny values
    let cases = [
        vec![(3.0, 2.5)],
        vec![(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)],
        vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.5)],
        vec![(0.0, 1e9), (1e7, 3e9)],
        vec![(0.0, 1e-7), (1.0, 3e-7)],
        vec![(-5.0, -2.0), (5.0, 2.0)],
    ];
    for pts in cases {
        let svg = loss_curve_svg(&[Series::new("s", pts.clone(), "teal")], "t", "x", "y");
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 1, "{pts:?}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{pts:?}");
    }
}

#[test]
fn smooth_is_a_trailing_moving_average() {
    let pts = [
        (0.0, 1.0),
        (1.0, 3.0),
        (2.0, f64::NAN),
        (3.0, 5.0),
        (4.0, 7.0),
    ];
    assert_eq!(
        smooth(&pts, 2),
        vec![(0.0, 1.0), (1.0, 2.0), (3.0, 4.0), (4.0, 6.0)]
    );
    assert_eq!(smooth(&pts, 1).len(), 4);
    assert_eq!(smooth(&pts, 0), smooth(&pts, 1));
    assert_eq!(smooth(&pts, 100)[3], (4.0, 4.0));
    assert!(smooth(&[], 5).is_empty());
}

#[test]
fn write_loss_curve_writes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("curves").join("loss.svg");
    let s = [Series::new("a", vec![(0.0, 1.0), (1.0, 0.5)], PALETTE[0])];
    write_loss_curve(&path, &s, "t", "x", "y").unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, loss_curve_svg(&s, "t", "x", "y"));
    // render one for a look: LQA_PLOT_OUT=/some/dir cargo test --test plot
    if let Some(out) = std::env::var_os("LQA_PLOT_OUT") {
        let train: Vec<(f64, f64)> = (0..=1500)
            .map(|i| {
                let x = i as f64;
                let noise = ((i * 7919) % 101) as f64 / 101.0 - 0.5;
                (x, 2.8 * (-x / 300.0).exp() + 0.35 + 0.35 * noise)
            })
            .collect();
        let eval: Vec<(f64, f64)> = (0..=6)
            .map(|i| {
                let x = i as f64 * 250.0;
                (x, 2.9 * (-x / 330.0).exp() + 0.5)
            })
            .collect();
        let series = [
            Series::new("train", train.clone(), "#c6d4e3"),
            Series::new("train (smoothed, 50)", smooth(&train, 50), PALETTE[0]),
            Series::new("eval", eval, PALETTE[1]),
        ];
        write_loss_curve(
            &std::path::Path::new(&out).join("example.svg"),
            &series,
            "Decoder loss — SmolLM2-135M",
            "step",
            "cross-entropy (nats/token)",
        )
        .unwrap();
    }
}

#[test]
fn tick_labels_have_the_decimals_the_step_needs() {
    let svg = loss_curve_svg(
        &[Series::new(
            "s",
            vec![(0.0, 0.0), (1000.0, 1.0)],
            PALETTE[0],
        )],
        "",
        "",
        "",
    );
    // y from 0 to 1 in about five ticks: steps of 0.25
    for t in ["0.00", "0.25", "0.50", "0.75", "1.00"] {
        assert!(svg.contains(&format!(">{t}</text>")), "y tick {t}");
    }
    for t in ["0", "200", "400", "1000"] {
        assert!(svg.contains(&format!(">{t}</text>")), "x tick {t}");
    }
}
