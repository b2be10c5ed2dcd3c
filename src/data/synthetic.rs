//! The embedded demo dataset: coloured shapes, rendered on the fly (fresh machines have no
//! ImageNet).
//!
//! 25 classes = 5 colours (`red green blue yellow purple`) x 5 shapes
//! (`circle square triangle star cross`), ids like `red_circle`, names like `"red circle"`:
//! every word is common English with a vector in GloVe and word2vec, so a label embedding is the
//! mean of two word vectors. Five classes are held out as **unseen** along a Latin-square
//! diagonal (`red_circle, green_square, blue_triangle, yellow_star, purple_cross`): every colour
//! and every shape still appears in 4 seen classes, so zero-shot transfer to an unseen class is
//! compositional ("purple" seen on stars, "cross" seen in red -> "purple cross").
//!
//! Each image: a noisy low-saturation background, one shape with random centre, size (22-38% of
//! the side as radius), rotation and a jittered colour, 2x2 supersampled (anti-aliased edges),
//! saved as JPEG quality 90. Deterministic given the seed; images are rendered in parallel
//! (rayon) with a per-image ChaCha8 stream, so thread count does not matter.

use std::path::Path;

use ::image::{Rgb, RgbImage};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::shards::{fnv1a, mix};

/// Colour words and their base RGB.
pub const COLOURS: [(&str, [u8; 3]); 5] = [
    ("red", [210, 35, 35]),
    ("green", [35, 165, 50]),
    ("blue", [35, 70, 215]),
    ("yellow", [235, 215, 40]),
    ("purple", [135, 45, 170]),
];
/// Shape words.
pub const SHAPES: [&str; 5] = ["circle", "square", "triangle", "star", "cross"];

/// What [`generate_shapes`] renders.
#[derive(Debug, Clone)]
pub struct ShapesOptions {
    /// Side of the square images, pixels (e.g. 32).
    pub image_size: u32,
    /// Training images per class (all 25 classes get them, unseen ones too, so the tree is a
    /// complete ImageFolder; the trainer filters unseen classes with its label map).
    pub train_per_class: usize,
    /// Validation images per class.
    pub val_per_class: usize,
    /// Seed; the same seed gives byte-identical files.
    pub seed: u64,
}

/// The classes of a generated dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapesDataset {
    /// All 25 ids, sorted (`"blue_circle"`, ...).
    pub classes: Vec<String>,
    /// The 20 seen ids, sorted.
    pub seen: Vec<String>,
    /// The 5 unseen ids (Latin-square diagonal), sorted.
    pub unseen: Vec<String>,
}

/// Renders the dataset into `dst`:
///
/// - `<dst>/train/<id>/<id>_<i>.JPEG` and `<dst>/val/<id>/<id>_<i>.JPEG` (ImageFolder);
/// - `<dst>/names.tsv`: `id TAB name` per class (ImageNet `words.txt` format), e.g.
///   `red_circle\tred circle`;
/// - `<dst>/split.tsv`: header `# wnid\tsplit\tnames`, then `id\tseen|unseen\tname`
///   (the format of `tiny-imagenet-200-zero-shot-split.tsv`).
///
/// Errors: `image_size < 8`, I/O failures (named by path).
pub fn generate_shapes(dst: &Path, opts: &ShapesOptions) -> Result<ShapesDataset> {
    if opts.image_size < 8 {
        bail!("shapes image_size must be >= 8, got {}", opts.image_size);
    }
    let mut all = Vec::new(); // (id, name, unseen)
    for (ci, (colour, _)) in COLOURS.iter().enumerate() {
        for (si, shape) in SHAPES.iter().enumerate() {
            all.push((
                format!("{colour}_{shape}"),
                format!("{colour} {shape}"),
                ci == si,
            ));
        }
    }
    all.sort();
    let mut names = String::new();
    let mut split = String::from("# wnid\tsplit\tnames\n");
    for (id, name, unseen) in &all {
        names.push_str(&format!("{id}\t{name}\n"));
        let which = if *unseen { "unseen" } else { "seen" };
        split.push_str(&format!("{id}\t{which}\t{name}\n"));
    }
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    write(&dst.join("names.tsv"), names.as_bytes())?;
    write(&dst.join("split.tsv"), split.as_bytes())?;

    for (split_name, per_class) in [("train", opts.train_per_class), ("val", opts.val_per_class)] {
        let jobs: Vec<(usize, usize, usize)> = (0..COLOURS.len())
            .flat_map(|c| (0..SHAPES.len()).map(move |s| (c, s)))
            .flat_map(|(c, s)| (0..per_class).map(move |i| (c, s, i)))
            .collect();
        for (c, s) in (0..COLOURS.len()).flat_map(|c| (0..SHAPES.len()).map(move |s| (c, s))) {
            let dir = dst
                .join(split_name)
                .join(format!("{}_{}", COLOURS[c].0, SHAPES[s]));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let split_tag = fnv1a(split_name.as_bytes());
        jobs.par_iter().try_for_each(|&(c, s, i)| -> Result<()> {
            let id = format!("{}_{}", COLOURS[c].0, SHAPES[s]);
            let seed = mix(&[opts.seed, split_tag, c as u64, s as u64, i as u64]);
            let img = render(c, s, opts.image_size, &mut ChaCha8Rng::seed_from_u64(seed));
            let mut jpg = Vec::new();
            ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
                .encode_image(&img)
                .context("JPEG encode")?;
            write(
                &dst.join(split_name)
                    .join(&id)
                    .join(format!("{id}_{i}.JPEG")),
                &jpg,
            )
        })?;
    }
    let ids = |f: fn(bool) -> bool| -> Vec<String> {
        all.iter()
            .filter(|(_, _, u)| f(*u))
            .map(|(id, _, _)| id.clone())
            .collect()
    };
    Ok(ShapesDataset {
        classes: ids(|_| true),
        seen: ids(|u| !u),
        unseen: ids(|u| u),
    })
}

fn write(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// Whether local point `(u, v)` (shape radius 1, centred) is inside shape `s`.
fn inside(s: usize, u: f32, v: f32, star: &[(f32, f32); 10]) -> bool {
    match s {
        0 => u * u + v * v <= 1.0,
        1 => u.abs().max(v.abs()) <= 0.78,
        2 => {
            // Equilateral triangle inscribed in the unit circle, apex up (v grows downwards in
            // image coordinates, so "up" is -v). Inradius 0.5; outward edge normals at
            // -90+180 = 90 deg (bottom edge) and 210, 330 deg.
            const N: [(f32, f32); 3] = [(0.0, 1.0), (-0.866_025_4, -0.5), (0.866_025_4, -0.5)];
            N.iter().all(|(nx, ny)| u * nx + v * ny <= 0.5)
        }
        3 => point_in_polygon(u, v, star),
        _ => {
            let (a, b) = (u.abs(), v.abs());
            (a <= 0.3 && b <= 0.92) || (b <= 0.3 && a <= 0.92)
        }
    }
}

fn point_in_polygon(x: f32, y: f32, poly: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Renders one image of colour `c`, shape `s`.
fn render(c: usize, s: usize, size: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let n = size as f32;
    let mut star = [(0f32, 0f32); 10];
    for (k, p) in star.iter_mut().enumerate() {
        let r = if k % 2 == 0 { 1.0 } else { 0.42 };
        let a = -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::PI / 5.0;
        *p = (r * a.cos(), r * a.sin());
    }
    // Background: grey level with a slight tint, per-pixel noise.
    let grey: f32 = rng.random_range(70.0..190.0);
    let tint: [f32; 3] = std::array::from_fn(|_| rng.random_range(-12.0..12.0));
    let base = COLOURS[c].1;
    let colour: [f32; 3] =
        std::array::from_fn(|k| (base[k] as f32 + rng.random_range(-22.0..22.0)).clamp(0.0, 255.0));
    let radius = n * rng.random_range(0.22..0.38);
    let cx = n * rng.random_range(0.32..0.68);
    let cy = n * rng.random_range(0.32..0.68);
    let theta: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (sin, cos) = theta.sin_cos();
    let mut img = RgbImage::new(size, size);
    for y in 0..size {
        for x in 0..size {
            // 2x2 supersampling -> coverage in [0, 1]
            let mut cover = 0.0;
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let (dx, dy) = (x as f32 + ox - cx, y as f32 + oy - cy);
                let u = (cos * dx + sin * dy) / radius;
                let v = (-sin * dx + cos * dy) / radius;
                if inside(s, u, v, &star) {
                    cover += 0.25;
                }
            }
            let noise: f32 = rng.random_range(-18.0..18.0);
            let px: [u8; 3] = std::array::from_fn(|k| {
                let bg = grey + tint[k];
                (bg * (1.0 - cover) + colour[k] * cover + noise).clamp(0.0, 255.0) as u8
            });
            img.put_pixel(x, y, Rgb(px));
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_distinct_masks() {
        let mut star = [(0f32, 0f32); 10];
        for (k, p) in star.iter_mut().enumerate() {
            let r = if k % 2 == 0 { 1.0 } else { 0.42 };
            let a = -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::PI / 5.0;
            *p = (r * a.cos(), r * a.sin());
        }
        let mask = |s: usize| -> Vec<bool> {
            (0..400)
                .map(|i| {
                    let (u, v) = ((i % 20) as f32 / 10.0 - 0.95, (i / 20) as f32 / 10.0 - 0.95);
                    inside(s, u, v, &star)
                })
                .collect()
        };
        let masks: Vec<_> = (0..5).map(mask).collect();
        for a in 0..5 {
            let area = masks[a].iter().filter(|&&b| b).count();
            assert!(area > 40, "shape {a} area {area}");
            for b in a + 1..5 {
                let diff = masks[a]
                    .iter()
                    .zip(&masks[b])
                    .filter(|(x, y)| x != y)
                    .count();
                assert!(diff > 20, "shapes {a} and {b} differ in only {diff} points");
            }
        }
    }
}
