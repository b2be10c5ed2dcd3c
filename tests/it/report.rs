//! Scope: `report.html` of a real run (`common::synthetic::trained_run`: the shapes, all
//! stages, hp@k on the shape hierarchy): it is one self-contained page (no external
//! references), its plots and example images are inline, and a headless browser (Debian's
//! chromium, installed by scripts/test.sh) loads every one of its images.
use crate::common::synthetic::trained_run;
use std::process::Command;

#[test]
fn report_html_is_self_contained_and_a_browser_renders_all_its_images() {
    let (dir, run) = trained_run();
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    let images = html.matches("<img ").count();
    // Loss, learning rate, hit@k bars, hp@k curves, per-class zero-shot bars, and 8 examples.
    assert!(images >= 5 + 8, "{images} images");
    assert_eq!(
        html.matches("src=\"data:image/").count(),
        images,
        "every image is inline"
    );
    for external in ["http://", "https://", "src=\"/", "href="] {
        assert!(!html.contains(external), "external reference {external}");
    }
    assert!(html.contains("<table>") && html.contains("hp@5"), "tables");

    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
    else {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true but no chromium (scripts/test.sh installs it)"
        );
        eprintln!("SKIP: no chromium on PATH: the browser half of this test did not run");
        return;
    };
    // The page plus a script that records, after load, how many images decoded to a non-empty
    // bitmap; --dump-dom prints the DOM with that attribute.
    let probe = dir.path().join("probe.html");
    std::fs::write(
        &probe,
        html.replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const i = [...document.images]; \
             document.body.setAttribute('data-loaded', i.filter(x => x.complete && \
             x.naturalWidth > 0 && x.naturalHeight > 0).length + '/' + i.length); });</script></body>",
        ),
    )
    .unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", probe.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains(&format!("data-loaded=\"{images}/{images}\"")),
        "the browser did not load every image: {}\n{}",
        dom.split("data-loaded")
            .nth(1)
            .map_or("(no attribute)", |s| &s[..20.min(s.len())]),
        String::from_utf8_lossy(&out.stderr)
    );
}
