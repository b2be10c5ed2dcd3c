//! Scope: `devise::data::image` on real full-size photos (`../shared/data/imagenet-sample-100`)
//! and field cases: EXIF orientation (applied / ignored, on decode and on the fused
//! decode + transform), reduced-scale JPEG decode (DCT scaling) against the full-size path, and
//! the field cases (B05 CMYK, B07 truncated, B08 grey, B10 bombs, progressive) through
//! `decode_train` / `decode_eval`, the functions the reader calls.

use devise::data::image::{
    decode_eval, decode_rgb, decode_train, eval_transform, train_transform, DecodeOptions,
    ExifOrientation,
};
use devise::data::Config;
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::shared_dir;

/// Bytes of `../shared/data/imagenet-sample-100/<name>`.
fn sample(name: &str) -> Vec<u8> {
    let path = shared_dir().join("data/imagenet-sample-100").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Bytes of `../shared/field-cases/<name>`.
fn field(name: &str) -> Vec<u8> {
    std::fs::read(shared_dir().join("field-cases").join(name)).unwrap()
}

/// `jpg` with an APP1 Exif segment (big-endian TIFF, one IFD0 entry: Orientation = `value`,
/// EXIF 2.32 tag 0x0112, SHORT) inserted right after SOI.
fn with_exif_orientation(jpg: &[u8], value: u16) -> Vec<u8> {
    assert_eq!(&jpg[..2], [0xFF, 0xD8], "not a JPEG");
    // Drop the photo's own Exif segments (the decoder reads the last one).
    let mut rest = Vec::new();
    let mut i = 2;
    while jpg[i + 1] != 0xDA {
        let len = u16::from_be_bytes([jpg[i + 2], jpg[i + 3]]) as usize;
        let seg = &jpg[i..i + 2 + len];
        if !(seg[1] == 0xE1 && seg[4..].starts_with(b"Exif\0\0")) {
            rest.extend_from_slice(seg);
        }
        i += 2 + len;
    }
    rest.extend_from_slice(&jpg[i..]);
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\0\x2A"); // byte order, magic 42
    tiff.extend_from_slice(&8u32.to_be_bytes()); // IFD0 offset
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // tag: Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // type: SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes()); // count
    tiff.extend_from_slice(&value.to_be_bytes()); // value, left-justified in 4 bytes
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no IFD1
    let payload_len = 6 + tiff.len();
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&((payload_len + 2) as u16).to_be_bytes());
    out.extend_from_slice(b"Exif\0\0");
    out.extend_from_slice(&tiff);
    out.extend_from_slice(&rest);
    out
}

/// The upright image a viewer shows for stored pixels `img` and EXIF `orientation` 3, 6 or 8,
/// written out pixel by pixel (not with the library's rotation).
fn upright(img: &RgbImage, orientation: u16) -> RgbImage {
    let (w, h) = img.dimensions();
    match orientation {
        3 => RgbImage::from_fn(w, h, |x, y| *img.get_pixel(w - 1 - x, h - 1 - y)),
        // 6: stored image must be turned 90 degrees clockwise: new (x, y) <- old (y, h-1-x)
        6 => RgbImage::from_fn(h, w, |x, y| *img.get_pixel(y, h - 1 - x)),
        // 8: 90 degrees counter-clockwise: new (x, y) <- old (w-1-y, x)
        8 => RgbImage::from_fn(h, w, |x, y| *img.get_pixel(w - 1 - y, x)),
        _ => unreachable!(),
    }
}

fn cfg(size: u32) -> Config {
    let mut c = Config::new("unused", size);
    c.min_crop_scale = 0.08;
    c
}

/// Mean and max absolute difference of two normalised CHW buffers, in 8-bit levels (x255, the
/// ImageNet std of ~0.226 undone).
fn diff_levels(a: &[f32], b: &[f32]) -> (f64, f64) {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64 * 0.226 * 255.0)
        .collect();
    (
        d.iter().sum::<f64>() / d.len() as f64,
        d.iter().cloned().fold(0.0, f64::max),
    )
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn exif_orientation_is_applied_or_ignored() {
    // 1600x1200 with an Exif segment of its own (replaced); landscape, so a quarter turn shows.
    let jpg = sample("n03337140_file.JPEG");
    let apply = DecodeOptions::new(1 << 26);
    let ignore = DecodeOptions {
        exif_orientation: ExifOrientation::Ignore,
        ..apply
    };
    let stored = decode_rgb(&jpg, &apply).unwrap();
    assert_eq!(stored.dimensions(), (1600, 1200));
    for orientation in [3, 6, 8] {
        let tagged = with_exif_orientation(&jpg, orientation);
        let got = decode_rgb(&tagged, &apply).unwrap();
        let want = upright(&stored, orientation);
        assert_eq!(
            got.dimensions(),
            want.dimensions(),
            "orientation {orientation}"
        );
        assert!(
            got == want,
            "orientation {orientation}: pixels differ from the upright image"
        );
        assert!(
            decode_rgb(&tagged, &ignore).unwrap() == stored,
            "orientation {orientation} ignored: pixels as stored"
        );
    }
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn exif_orientation_reaches_the_fused_decode_and_transform() {
    // 1024x768: the crops here take the reduced-scale path too.
    let jpg = sample("n03538406_horse_cart.JPEG");
    let tagged = with_exif_orientation(&jpg, 6);
    let mut c = cfg(224);
    let full = decode_rgb(&jpg, &DecodeOptions::from(&c)).unwrap();
    let rotated = upright(&full, 6);
    let n = 3 * 224 * 224;
    let (mut fused, mut reference, mut unrotated) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    for dct in [false, true] {
        c.jpeg_dct_scaling = dct;
        for seed in 0..4 {
            decode_train(
                &tagged,
                &c,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &mut fused,
            )
            .unwrap();
            train_transform(
                &rotated,
                &c,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &mut reference,
            );
            let (mean, _) = diff_levels(&fused, &reference);
            if dct {
                // bound of reduced_scale_decode_matches_full_decode_on_real_photos
                assert!(
                    mean < 6.0,
                    "seed {seed}: {mean:.2} levels from the rotated reference"
                );
            } else {
                assert!(fused == reference, "seed {seed}: {mean:.2} levels off");
            }
            // The same crop parameters on the stored (unrotated) image are far off.
            train_transform(
                &full,
                &c,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &mut unrotated,
            );
            let (far, _) = diff_levels(&fused, &unrotated);
            assert!(
                far > 10.0 && far > 4.0 * mean,
                "seed {seed}: {far:.2} vs {mean:.2}"
            );
        }
        decode_eval(&tagged, &c, &mut fused).unwrap();
        eval_transform(&rotated, &c, &mut reference);
        assert!(diff_levels(&fused, &reference).0 < if dct { 6.0 } else { 1e-9 });
    }
    c.exif_orientation = ExifOrientation::Ignore;
    c.jpeg_dct_scaling = false;
    decode_eval(&tagged, &c, &mut fused).unwrap();
    eval_transform(&full, &c, &mut reference);
    assert!(fused == reference, "ignored: the stored image's eval crop");
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn reduced_scale_decode_matches_full_decode_on_real_photos() {
    let dir = shared_dir();
    let mut names: Vec<_> = std::fs::read_dir(dir.join("data/imagenet-sample-100"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let n = 3 * 224 * 224;
    let (mut scaled, mut full, mut reference) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let mut differs = 0;
    let (mut worst_mean, mut sum_mean, mut reduced) = (0f64, 0f64, 0usize);
    for (i, path) in names.iter().enumerate() {
        let bytes = std::fs::read(path).unwrap();
        for scale in [0.08, 1.0] {
            let mut c = cfg(224);
            c.min_crop_scale = scale;
            let seed = i as u64;
            // Off: exactly decode_rgb + train_transform / eval_transform.
            c.jpeg_dct_scaling = false;
            decode_train(&bytes, &c, &mut ChaCha8Rng::seed_from_u64(seed), &mut full).unwrap();
            let img = decode_rgb(&bytes, &DecodeOptions::from(&c)).unwrap();
            train_transform(
                &img,
                &c,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &mut reference,
            );
            assert!(
                full == reference,
                "{}: off must equal the two-step path",
                path.display()
            );
            // On: the same crop (drawn from full-size dimensions), close in value.
            c.jpeg_dct_scaling = true;
            decode_train(
                &bytes,
                &c,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &mut scaled,
            )
            .unwrap();
            let (mean, _) = diff_levels(&scaled, &full);
            assert!(mean < 6.0, "{}: {mean:.2} levels", path.display());
            worst_mean = worst_mean.max(mean);
            if scaled != full {
                differs += 1;
                (sum_mean, reduced) = (sum_mean + mean, reduced + 1);
            }
            // Eval too.
            decode_eval(&bytes, &c, &mut scaled).unwrap();
            eval_transform(&img, &c, &mut reference);
            let (mean, _) = diff_levels(&scaled, &reference);
            assert!(mean < 6.0, "{}: eval {mean:.2} levels", path.display());
            worst_mean = worst_mean.max(mean);
            if scaled != reference {
                (sum_mean, reduced) = (sum_mean + mean, reduced + 1);
            }
        }
    }
    let mean = sum_mean / reduced.max(1) as f64;
    eprintln!(
        "reduced-scale decode: {differs} of 200 train crops, {} eval crops took it; mean |diff| \
         {mean:.2} levels over those, worst {worst_mean:.2}",
        reduced - differs
    );
    // A 2-step downscale differs from a 1-step one by a couple of levels on average.
    assert!(mean < 3.0, "{mean:.2}");
    // Whole-image crops of the larger photos (shorter side >= 448) must have used it.
    assert!(
        differs >= 15,
        "only {differs} crops were decoded at reduced scale"
    );
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn field_cases_through_the_fused_decode() {
    let (cmyk, grey, cut, headers, png_bomb, jpg_bomb) = (
        field("B05_cmyk.jpg"),
        field("B08_gray.jpg"),
        field("B07_truncated_60pct.jpg"),
        field("B07_headers_only.jpg"),
        field("B10_png_30000x30000.png"),
        field("B10_jpeg_sof_65000.jpg"),
    );
    let c = cfg(16);
    let mut out = vec![0f32; 3 * 16 * 16];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // B05: CMYK goes to the zune-jpeg fallback; RGB, not inverted (mean red channel high).
    decode_train(&cmyk, &c, &mut rng, &mut out).unwrap();
    let red = out[..256].iter().sum::<f32>() / 256.0 * 0.229 + 0.485;
    assert!(red > 0.6, "B05 mean red {red}");
    // B08: grey JPEG -> equal channels after un-normalising.
    decode_eval(&grey, &c, &mut out).unwrap();
    for i in 0..256 {
        let r = out[i] * 0.229 + 0.485;
        let g = out[256 + i] * 0.224 + 0.456;
        assert!((r - g).abs() < 1e-4, "grey pixel {i}: {r} vs {g}");
    }
    // B07: truncated stays rejected, not grey-filled.
    let e = decode_train(&cut, &c, &mut rng, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    assert!(decode_eval(&headers, &c, &mut out).is_err());
    // B10: bombs rejected from the header.
    let e = decode_train(&png_bomb, &c, &mut rng, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds max_pixels"), "{e}");
    let e = decode_eval(&jpg_bomb, &c, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("image 65000x65000 exceeds max_pixels"), "{e}");
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn progressive_and_corrupt_jpegs_decode() {
    let jpg = sample("n03538406_horse_cart.JPEG");
    let c = cfg(224);
    let img = decode_rgb(&jpg, &DecodeOptions::from(&c)).unwrap();
    assert_eq!(img.dimensions(), (1024, 768));
    // Progressive re-encoding of the same pixels (libjpeg-turbo's encoder, quality 95).
    let mut enc = turbojpeg::Compressor::new().unwrap();
    enc.set_quality(95).unwrap();
    enc.set_progressive(true).unwrap();
    let progressive = enc
        .compress_to_vec(turbojpeg::Image {
            pixels: img.as_raw().as_slice(),
            width: 1024,
            pitch: 1024 * 3,
            height: 768,
            format: turbojpeg::PixelFormat::RGB,
        })
        .unwrap();
    let sof2 = progressive.windows(2).any(|w| w == [0xFF, 0xC2]);
    assert!(sof2, "the re-encoding is progressive (SOF2)");
    let n = 3 * 224 * 224;
    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
    for scale in [0.08, 1.0] {
        let mut c = cfg(224);
        c.min_crop_scale = scale;
        decode_train(&progressive, &c, &mut ChaCha8Rng::seed_from_u64(1), &mut a).unwrap();
        decode_train(&jpg, &c, &mut ChaCha8Rng::seed_from_u64(1), &mut b).unwrap();
        let (mean, _) = diff_levels(&a, &b);
        assert!(mean < 2.5, "progressive vs baseline: {mean:.2} levels");
    }
    // Corrupt entropy data (EOI still present): libjpeg-turbo warns -> error -> the zune-jpeg
    // full-size decode, which conceals the damage; a sample, not a failure.
    let mut corrupt = jpg.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid..mid + 64].fill(0xAB);
    decode_train(&corrupt, &c, &mut ChaCha8Rng::seed_from_u64(1), &mut a).unwrap();
    assert_eq!(
        decode_rgb(&corrupt, &DecodeOptions::from(&c))
            .unwrap()
            .dimensions(),
        (1024, 768)
    );
}
