//! Image bytes -> 8-bit RGB -> normalised CHW `f32`: decoding with format sniffing and a
//! decompression-bomb guard, RandomResizedCrop + flip for training, resize + centre crop for
//! evaluation.
//!
//! The transforms follow torchvision's ImageNet recipe (`RandomResizedCrop`,
//! `RandomHorizontalFlip`, `Resize(round(s/0.875))` + `CenterCrop(s)`, `Normalize`), with one
//! fused step: the crop rectangle is resampled straight to `s x s` by a separable, antialiased
//! triangle (bilinear) filter, PIL's `Image.resize(BILINEAR)` algorithm (the `fast_image_resize`
//! crate, SIMD), so no intermediate resized image of the full crop is allocated.
//!
//! [`decode_train`] / [`decode_eval`] (what the reader calls) decode and transform in one step:
//! the crop is drawn from the full-size dimensions in the header, and when the crop still covers
//! at least `image_size` pixels per side at 1/2, 1/4 or 1/8 scale, a JPEG is decoded at that
//! scale by DCT scaling (`data.jpeg_dct_scaling`, default on; see [`decode_train`]), and only
//! the part of it around the crop is decoded.
//!
//! Policies (torchvision's `ImageFolder` loader, `PIL.Image.convert("RGB")`, unless noted):
//! - the format is sniffed from magic bytes, never taken from the file name (ImageNet holds a PNG
//!   named `.JPEG`, field case B06); JPEG and PNG are compiled in, anything else is an error;
//! - greyscale is replicated to 3 channels; 16-bit samples are scaled to 0..255 (`x/257`,
//!   rounded); alpha is DROPPED, not composited (transparent pixels show their stored colour);
//!   palette images are expanded; CMYK / YCCK (Adobe) JPEGs are converted to RGB (B05);
//! - EXIF orientation (JPEG APP1 `Exif`, PNG `eXIf`) is APPLIED by default, as
//!   `PIL.ImageOps.exif_transpose` would: a photo stored sideways with Orientation=6 comes out
//!   upright, and crops are drawn on the upright image. `data.exif_orientation = "ignore"` keeps
//!   the stored pixel grid (what a bare `Image.open().convert("RGB")` gives). Training,
//!   evaluation and prediction all decode here, so they agree;
//! - a JPEG without an end-of-image marker after its scan data is rejected as truncated (B07):
//!   the decoder would otherwise fill the missing part with grey. There is no "keep partial
//!   images" option: such samples are skipped and counted.

use std::io::Cursor;

use ::image::codecs::jpeg::JpegDecoder;
use ::image::codecs::png::PngDecoder;
use ::image::metadata::Orientation;
use ::image::{DynamicImage, ImageDecoder, Limits, RgbImage};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Config;

/// What decoding does with an image's EXIF orientation tag (`data.exif_orientation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExifOrientation {
    /// Rotate / mirror the decoded pixels as the tag says (EXIF 2.32 tag 0x0112, values 1-8),
    /// so the image is upright. The default.
    #[default]
    Apply,
    /// Keep the pixels as stored.
    Ignore,
}

/// The decoding policy knobs of [`decode_rgb`], from [`Config`] (`From<&Config>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Images whose header claims more than this many pixels are rejected before any pixel
    /// buffer is allocated ([`Config::max_pixels`]).
    pub max_pixels: u64,
    /// EXIF orientation policy ([`Config::exif_orientation`]).
    pub exif_orientation: ExifOrientation,
}

impl DecodeOptions {
    /// `max_pixels` with every other option at its default (EXIF orientation applied).
    pub fn new(max_pixels: u64) -> DecodeOptions {
        DecodeOptions {
            max_pixels,
            exif_orientation: ExifOrientation::default(),
        }
    }
}

impl From<&Config> for DecodeOptions {
    fn from(cfg: &Config) -> DecodeOptions {
        DecodeOptions {
            max_pixels: cfg.max_pixels,
            exif_orientation: cfg.exif_orientation,
        }
    }
}

/// Decodes `bytes` (JPEG or PNG, whatever the file name says) at full size to 8-bit RGB,
/// `[height][width][3]`, upright unless `opts.exif_orientation` is `Ignore` (then width and
/// height are as stored; with `Apply` they are swapped for the 90/270 degree orientations).
///
/// Decoders: greyscale and YCbCr/RGB JPEGs by libjpeg-turbo (the `turbojpeg` crate, statically
/// built); CMYK/YCCK JPEGs, any JPEG libjpeg-turbo rejects, and PNGs by the `image` crate
/// (zune-jpeg, png).
///
/// The width and height are read from the format header first; an image with more than
/// `opts.max_pixels` pixels is rejected before any pixel buffer is allocated (field case B10:
/// "image 30000x30000 exceeds max_pixels (89478485)").
///
/// Errors: unknown or unsupported format (named from its magic bytes), truncated or corrupt data,
/// too many pixels. Never panics on hostile input.
pub fn decode_rgb(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage> {
    match sniff(bytes) {
        Sniffed::Jpeg => Ok(Jpeg::open(bytes, opts)?.decode(8, None)?.img),
        Sniffed::Png => {
            let (w, h) = png_dimensions(bytes)?;
            check_pixels(w, h, opts.max_pixels)?;
            let mut decoder =
                PngDecoder::with_limits(Cursor::new(bytes), limits_for(opts.max_pixels))
                    .context("PNG header")?;
            let orientation = orientation_under(opts, &mut decoder)?;
            finish(decoder, orientation, "PNG")
        }
        Sniffed::Other(name) => bail!("unsupported image format: {name} (JPEG and PNG only)"),
    }
}

/// A JPEG whose header passed the checks (dimensions within `max_pixels`, end-of-image marker
/// present); nothing the size of the image is allocated yet.
struct Jpeg<'a> {
    bytes: &'a [u8],
    info: JpegInfo,
    max_pixels: u64,
    orientation: Orientation,
}

impl<'a> Jpeg<'a> {
    fn open(bytes: &'a [u8], opts: &DecodeOptions) -> Result<Jpeg<'a>> {
        let info = scan_jpeg(bytes)?;
        check_pixels(info.width, info.height, opts.max_pixels)?;
        if !info.has_eoi {
            bail!(
                "truncated JPEG {}x{}: no end-of-image marker after the scan data",
                info.width,
                info.height
            );
        }
        // The image crate's EXIF reader on the APP1 segment found by the scan, as its JPEG
        // decoder reads it (which would parse the headers twice more to find it).
        let orientation = match opts.exif_orientation {
            ExifOrientation::Apply => info
                .exif
                .clone()
                .and_then(|r| Orientation::from_exif_chunk(&bytes[r]))
                .unwrap_or(Orientation::NoTransforms),
            ExifOrientation::Ignore => Orientation::NoTransforms,
        };
        Ok(Jpeg {
            bytes,
            info,
            max_pixels: opts.max_pixels,
            orientation,
        })
    }

    /// Full-size `(width, height)` after orientation.
    fn dimensions(&self) -> (u32, u32) {
        oriented(self.info.width, self.info.height, self.orientation)
    }

    /// Decodes at `eighths/8` scale (8: full size; 1, 2, 4: DCT scaling; greyscale and
    /// YCbCr/RGB only), oriented; with `region` (`x0, y0, x1, y1` in pixels of the image at that
    /// scale, exclusive ends; honoured only without an orientation transform) possibly only a
    /// part of it containing the region. libjpeg-turbo first; if it fails, or for CMYK/YCCK, the
    /// image crate at full size, whole: callers map by the returned [`Decoded`].
    fn decode(self, eighths: u32, region: Option<(u32, u32, u32, u32)>) -> Result<Decoded> {
        if matches!(self.info.components, 1 | 3) {
            let region = region.filter(|_| self.orientation == Orientation::NoTransforms);
            match decode_turbo(self.bytes, eighths, region) {
                Ok((img, offset)) => {
                    return Ok(Decoded {
                        img: orient(img, self.orientation),
                        factor: eighths as f64 / 8.0,
                        offset,
                    })
                }
                Err(e) => tracing::debug!("libjpeg-turbo: {e:#}; decoding with zune-jpeg"),
            }
        }
        let mut fallback = JpegDecoder::new(Cursor::new(self.bytes)).context("JPEG header")?;
        fallback.set_limits(limits_for(self.max_pixels))?;
        Ok(Decoded {
            img: finish(fallback, self.orientation, "JPEG")?,
            factor: 1.0,
            offset: (0, 0),
        })
    }
}

/// A decoded JPEG: `img` is the part at `offset` (pixels) of the whole image at `factor` of its
/// full size.
struct Decoded {
    img: RgbImage,
    factor: f64,
    offset: (u32, u32),
}

/// iMCU width in pixels per TurboJPEG subsampling (`TJSAMP_444` .. `TJSAMP_441`): turbojpeg.h's
/// `tjMCUWidth` (a `static const` there, so not a linkable symbol).
const TJ_MCU_WIDTH: [u32; 7] = [8, 16, 16, 8, 8, 32, 8];

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Owns a TurboJPEG decompression handle.
struct TjHandle(turbojpeg::raw::tjhandle);

impl Drop for TjHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init, is non-null, and is destroyed exactly once.
        unsafe { turbojpeg::raw::tj3Destroy(self.0) }
    }
}

impl TjHandle {
    fn error(&self, what: &str) -> anyhow::Error {
        // SAFETY: a valid handle; tj3GetErrorStr returns a NUL-terminated string owned by the
        // handle (or a static one), copied out before the handle can change.
        let msg = unsafe { std::ffi::CStr::from_ptr(turbojpeg::raw::tj3GetErrorStr(self.0)) };
        anyhow!("{what}: {}", msg.to_string_lossy())
    }

    fn check(&self, rc: std::ffi::c_int, what: &str) -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(self.error(what))
        }
    }
}

/// Decodes a greyscale or YCbCr/RGB JPEG with libjpeg-turbo at `eighths/8` scale to RGB, as
/// stored (not oriented): the whole `ceil(W*e/8) x ceil(H*e/8)` image, or with `region` only a
/// rectangle containing it (libjpeg-turbo's partial decode: rows below are never entropy-decoded,
/// rows above are skipped without inverse DCT, columns outside are not transformed or colour
/// converted). The rectangle's left edge is aligned down to the scaled iMCU width as
/// libjpeg-turbo requires, and it is widened by one iMCU and 16 rows on each side so that its
/// pixels equal the whole-image decode's (chroma upsampling reads neighbours). Returns the image
/// and its offset in the whole scaled image. Corrupt data that libjpeg-turbo only warns about is
/// an error here (the caller falls back).
fn decode_turbo(
    bytes: &[u8],
    eighths: u32,
    region: Option<(u32, u32, u32, u32)>,
) -> Result<(RgbImage, (u32, u32))> {
    use turbojpeg::raw;
    // SAFETY: tj3Init has no preconditions; a null result is checked before use.
    let handle = TjHandle(unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as _) });
    if handle.0.is_null() {
        bail!("tj3Init failed");
    }
    // SAFETY (all calls below): `handle` is a valid decompression handle; `bytes` outlives the
    // calls and its length is passed with its pointer; `pixels` is allocated for exactly the
    // width x height x 3 bytes libjpeg-turbo writes (pitch 0 = width * 3).
    let rc = unsafe { raw::tj3DecompressHeader(handle.0, bytes.as_ptr(), bytes.len() as _) };
    handle.check(rc, "JPEG header")?;
    let get = |p: raw::TJPARAM| unsafe { raw::tj3Get(handle.0, p as _) };
    let (w, h) = (
        get(raw::TJPARAM_TJPARAM_JPEGWIDTH),
        get(raw::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    let subsamp = get(raw::TJPARAM_TJPARAM_SUBSAMP);
    if w <= 0 || h <= 0 {
        bail!("JPEG header: {w}x{h}");
    }
    // In lowest terms: libjpeg-turbo matches factors exactly (4/8 is "unsupported", 1/2 is not).
    let g = gcd(eighths, 8);
    let factor = raw::tjscalingfactor {
        num: (eighths / g) as _,
        denom: (8 / g) as _,
    };
    let rc = unsafe { raw::tj3SetScalingFactor(handle.0, factor) };
    handle.check(rc, "scaling factor")?;
    let scaled = |v: u32| (v * eighths).div_ceil(8);
    let (sw, sh) = (scaled(w as u32), scaled(h as u32));
    let (mut x0, mut y0, mut x1, mut y1) = (0, 0, sw, sh);
    if let (Some(r), Some(&mcu)) = (region, TJ_MCU_WIDTH.get(subsamp as usize)) {
        let mcu = scaled(mcu);
        x0 = r.0.min(sw).saturating_sub(mcu) / mcu * mcu;
        x1 = r.2.saturating_add(mcu).clamp(x0 + 1, sw);
        y0 = r.1.min(sh).saturating_sub(16);
        y1 = r.3.saturating_add(16).clamp(y0 + 1, sh);
        if (x0, y0, x1, y1) != (0, 0, sw, sh) {
            let region = raw::tjregion {
                x: x0 as _,
                y: y0 as _,
                w: (x1 - x0) as _,
                h: (y1 - y0) as _,
            };
            let rc = unsafe { raw::tj3SetCroppingRegion(handle.0, region) };
            handle.check(rc, "cropping region")?;
        }
    }
    let (cw, ch) = (x1 - x0, y1 - y0);
    let mut pixels = vec![0u8; cw as usize * ch as usize * 3];
    let rc = unsafe {
        raw::tj3Decompress8(
            handle.0,
            bytes.as_ptr(),
            bytes.len() as _,
            pixels.as_mut_ptr(),
            0,
            raw::TJPF_TJPF_RGB as _,
        )
    };
    handle.check(rc, "JPEG decode")?;
    let img = RgbImage::from_raw(cw, ch, pixels).ok_or_else(|| anyhow!("buffer size"))?;
    Ok((img, (x0, y0)))
}

/// The orientation to apply under `opts` (the image crate's EXIF reader; a missing or malformed
/// tag reads as "no transform").
fn orientation_under(opts: &DecodeOptions, decoder: &mut impl ImageDecoder) -> Result<Orientation> {
    Ok(match opts.exif_orientation {
        ExifOrientation::Apply => decoder.orientation().context("reading EXIF orientation")?,
        ExifOrientation::Ignore => Orientation::NoTransforms,
    })
}

/// Decodes the pixels, converts to 8-bit RGB, then orients.
fn finish(decoder: impl ImageDecoder, orientation: Orientation, format: &str) -> Result<RgbImage> {
    let dynamic =
        DynamicImage::from_decoder(decoder).with_context(|| format!("{format} decode"))?;
    Ok(orient(dynamic.into_rgb8(), orientation))
}

fn orient(rgb: RgbImage, orientation: Orientation) -> RgbImage {
    if orientation == Orientation::NoTransforms {
        return rgb;
    }
    let mut dynamic = DynamicImage::ImageRgb8(rgb);
    dynamic.apply_orientation(orientation);
    dynamic.into_rgb8()
}

/// `(width, height)` after `orientation`.
fn oriented(width: u32, height: u32, orientation: Orientation) -> (u32, u32) {
    match orientation {
        Orientation::Rotate90
        | Orientation::Rotate270
        | Orientation::Rotate90FlipH
        | Orientation::Rotate270FlipH => (height, width),
        _ => (width, height),
    }
}

fn limits_for(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    // The header check above is the real guard; this bounds the decoder's own allocations
    // (16-bit RGBA output is 8 bytes/pixel) as a second line.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    limits
}

fn check_pixels(width: u32, height: u32, max_pixels: u64) -> Result<()> {
    if width == 0 || height == 0 {
        bail!("image {width}x{height} has no pixels");
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        bail!("image {width}x{height} exceeds max_pixels ({max_pixels})");
    }
    Ok(())
}

enum Sniffed {
    Jpeg,
    Png,
    Other(&'static str),
}

fn sniff(b: &[u8]) -> Sniffed {
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Sniffed::Jpeg
    } else if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Sniffed::Png
    } else if b.starts_with(b"GIF8") {
        Sniffed::Other("GIF")
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Sniffed::Other("WebP")
    } else if b.starts_with(b"BM") {
        Sniffed::Other("BMP")
    } else if b.starts_with(b"II*\0") || b.starts_with(b"MM\0*") {
        Sniffed::Other("TIFF")
    } else if b.is_empty() {
        Sniffed::Other("empty file")
    } else {
        Sniffed::Other("unknown (no JPEG or PNG signature)")
    }
}

/// Width and height from a PNG's IHDR chunk (bytes 16..24).
fn png_dimensions(b: &[u8]) -> Result<(u32, u32)> {
    if b.len() < 24 || &b[12..16] != b"IHDR" {
        bail!("truncated or corrupt PNG: no IHDR chunk");
    }
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    Ok((w, h))
}

struct JpegInfo {
    width: u32,
    height: u32,
    /// Colour components in the frame (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK).
    components: u8,
    /// An end-of-image marker follows the first scan's data.
    has_eoi: bool,
    /// Byte range of the EXIF data (the TIFF structure after `Exif\0\0`) of the last EXIF APP1
    /// segment before the first scan, if any.
    exif: Option<std::ops::Range<usize>>,
}

/// Walks the JPEG marker segments up to the first start-of-scan: the frame header gives the
/// dimensions, an APP1 `Exif` segment the EXIF data; then looks for the end-of-image marker
/// (`FF D9`). Inside entropy-coded data a `FF` byte is always followed by `00` or a restart
/// marker, so `FF D9` after the scan start is the real end of image (ITU T.81, B.1.1.5).
fn scan_jpeg(b: &[u8]) -> Result<JpegInfo> {
    let truncated = || anyhow!("truncated JPEG: ends inside its headers");
    let mut i = 2; // after SOI
    let mut dims: Option<(u32, u32, u8)> = None;
    let mut exif = None;
    loop {
        if i >= b.len() {
            return Err(truncated());
        }
        if b[i] != 0xFF {
            bail!("corrupt JPEG: expected a marker at byte {i}");
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1; // fill bytes
        }
        let marker = *b.get(i).ok_or_else(truncated)?;
        i += 1;
        match marker {
            0x01 | 0xD0..=0xD8 => continue, // standalone markers
            0xD9 => bail!("corrupt JPEG: end of image before any scan"),
            _ => {}
        }
        if i + 2 > b.len() {
            return Err(truncated());
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        if len < 2 {
            bail!("corrupt JPEG: segment length {len} at byte {i}");
        }
        let seg = b.get(i + 2..i + len).ok_or_else(truncated)?;
        if marker == 0xE1 && seg.starts_with(b"Exif\0\0") {
            exif = Some(i + 8..i + len); // the last one counts, as in zune-jpeg
        }
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            if seg.len() < 6 {
                bail!("corrupt JPEG: short frame header");
            }
            let h = u16::from_be_bytes([seg[1], seg[2]]) as u32;
            let w = u16::from_be_bytes([seg[3], seg[4]]) as u32;
            if h == 0 {
                bail!("unsupported JPEG: height defined by a DNL marker");
            }
            dims = Some((w, h, seg[5]));
        }
        i += len;
        if marker == 0xDA {
            break;
        }
    }
    let (width, height, components) =
        dims.ok_or_else(|| anyhow!("corrupt JPEG: scan before frame header"))?;
    let has_eoi = b[i.min(b.len())..].windows(2).any(|w| w == [0xFF, 0xD9]);
    Ok(JpegInfo {
        width,
        height,
        components,
        has_eoi,
        exif,
    })
}

/// A source rectangle in pixel units (may be fractional), origin top-left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    /// Left edge, source pixels.
    pub x: f64,
    /// Top edge, source pixels.
    pub y: f64,
    /// Width, source pixels.
    pub w: f64,
    /// Height, source pixels.
    pub h: f64,
}

/// RandomResizedCrop parameters (torchvision `RandomResizedCrop.get_params`): an integer crop
/// `(x, y, w, h)` of a `width x height` image covering `U(scale.0, scale.1)` of its area with
/// aspect ratio `w/h` log-uniform in [3/4, 4/3]; 10 tries, then a centre crop clamped to that
/// ratio range. Always `0 < w <= width`, `0 < h <= height`, inside the image.
pub fn random_resized_crop_params(
    width: u32,
    height: u32,
    scale: (f32, f32),
    rng: &mut impl rand::Rng,
) -> (u32, u32, u32, u32) {
    let (wf, hf) = (width as f64, height as f64);
    let area = wf * hf;
    let (lo_r, hi_r) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0 as f64..=scale.1 as f64);
        let aspect = rng.random_range(lo_r..=hi_r).exp();
        let w = (target * aspect).sqrt().round() as u32;
        let h = (target / aspect).sqrt().round() as u32;
        if w > 0 && w <= width && h > 0 && h <= height {
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return (x, y, w, h);
        }
    }
    let ratio = wf / hf;
    let (w, h) = if ratio < 3.0 / 4.0 {
        (width, ((wf / (3.0 / 4.0)).round() as u32).clamp(1, height))
    } else if ratio > 4.0 / 3.0 {
        (((hf * (4.0 / 3.0)).round() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// Training transform into `out` (`[3, s, s]` CHW, `s = cfg.image_size`, normalised
/// `(x/255 - mean) / std`) of an already decoded image: with `cfg.augment`, RandomResizedCrop
/// (area scale `(cfg.min_crop_scale, 1)`, ratio 3/4..4/3) resized to `s x s` and a horizontal
/// flip with probability 0.5; without, exactly [`eval_transform`] (and `rng` is not used).
///
/// Panics if `out.len() != 3*s*s` (a caller bug, not a data error).
pub fn train_transform(img: &RgbImage, cfg: &Config, rng: &mut impl rand::Rng, out: &mut [f32]) {
    let crop = train_crop(img.width(), img.height(), cfg, rng);
    resample(img, &crop, cfg, out);
}

/// Eval transform into `out` (`[3, s, s]` CHW, normalised) of an already decoded image: resize
/// so the shorter side is [`Config::eval_resize_px`] (longer side `int(r * long / short)`,
/// torchvision `Resize`), then centre crop `s x s` (offsets `round((side - s) / 2)`, torchvision
/// `CenterCrop`).
///
/// Panics if `out.len() != 3*s*s`.
pub fn eval_transform(img: &RgbImage, cfg: &Config, out: &mut [f32]) {
    let crop = eval_crop(img.width(), img.height(), cfg);
    resample(img, &crop, cfg, out);
}

/// Decodes `bytes` and applies the training transform into `out` (`[3, s, s]` CHW, normalised):
/// the same crop and flip as [`decode_rgb`] + [`train_transform`] (the crop is drawn from the
/// full-size, oriented dimensions in the header, so `rng` is used identically and augmentation
/// stays a function of the seed and the image size alone), but a JPEG may be decoded at reduced
/// scale.
///
/// Reduced scale (`cfg.jpeg_dct_scaling`, default on): the smallest of 1/8, 1/4, 1/2 at which
/// the crop rectangle still spans at least `s` pixels in both directions is decoded by DCT
/// scaling (libjpeg-turbo's `scale_denom`: each 8x8 block's inverse DCT yields 4x4, 2x2 or 1x1
/// samples), and the crop is mapped into that image. The final resample is then still a
/// downscale (or 1:1), as with the full decode, so nothing is upsampled that the full decode
/// would not have. Values differ from the full-size path as a 2-step downscale differs from a
/// 1-step one: over the 100 photos of `imagenet-sample-100`, a mean of at most ~5 of 255 levels
/// on the most textured ones (tests/it/image.rs measures it). Only greyscale and YCbCr/RGB JPEGs
/// take this path; CMYK/YCCK, PNG, and any JPEG libjpeg-turbo rejects are decoded at full size.
/// With `cfg.jpeg_dct_scaling = false` the output equals [`decode_rgb`] + [`train_transform`]
/// exactly.
///
/// Partial decode (always, for images without an EXIF rotation/flip): libjpeg-turbo decodes
/// only a rectangle around the pixels the filter reads (see `decode_turbo`); its pixels equal
/// the whole decode's, so this changes speed, not values.
///
/// Errors: as [`decode_rgb`] (names no sample: the caller adds which). Panics if
/// `out.len() != 3*s*s`.
pub fn decode_train(
    bytes: &[u8],
    cfg: &Config,
    rng: &mut impl rand::Rng,
    out: &mut [f32],
) -> Result<()> {
    decode_cropped(bytes, cfg, |w, h| train_crop(w, h, cfg, rng), out)
}

/// Decodes `bytes` and applies the eval transform into `out` (`[3, s, s]` CHW, normalised):
/// [`decode_rgb`] + [`eval_transform`], with the reduced-scale JPEG decode of [`decode_train`]
/// (the centre crop's source rectangle decides the scale).
///
/// Errors: as [`decode_rgb`]. Panics if `out.len() != 3*s*s`.
pub fn decode_eval(bytes: &[u8], cfg: &Config, out: &mut [f32]) -> Result<()> {
    decode_cropped(bytes, cfg, |w, h| eval_crop(w, h, cfg), out)
}

/// What the output is resampled from, in pixels of the source image.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Crop {
    /// Source rectangle mapped onto the `s x s` output.
    rect: Rect,
    /// Pixels the filter may read, `(x0, y0, x1, y1)`, exclusive ends: torchvision crops, then
    /// resizes, so RandomResizedCrop never reads outside its crop; eval reads the whole image.
    bounds: (u32, u32, u32, u32),
    /// Mirror horizontally.
    flip: bool,
}

impl Crop {
    /// Smallest DCT scale `e/8`, `e` in 1, 2, 4 (else 8: full size), at which the rectangle
    /// still spans at least `s` pixels per side (a `W x H` JPEG decodes to
    /// `ceil(W*e/8) x ceil(H*e/8)`, never less than `W*e/8`). libjpeg-turbo also has 3/8, 5/8,
    /// 3/4, 7/8, but measured slower than 1/2 or full size (BENCHMARKS.md).
    fn dct_eighths(&self, s: u32) -> u32 {
        let s = s as f64;
        [1, 2, 4]
            .into_iter()
            .find(|&e| self.rect.w * e as f64 / 8.0 >= s && self.rect.h * e as f64 / 8.0 >= s)
            .unwrap_or(8)
    }

    /// The same crop in the image decoded at `factor` (e/8) of full size, `to` = its
    /// (width, height); itself for `factor == 1`. DCT scaling maps full-size coordinate `x` to
    /// exactly `x * e/8` (an 8x8 block becomes e x e samples); the last row/column of an image
    /// whose size is not a multiple of 8/e is a partial sample, so bounds are clamped to `to`.
    fn scaled(&self, factor: f64, to: (u32, u32)) -> Crop {
        if factor == 1.0 {
            return *self;
        }
        let (x0, y0, x1, y1) = self.bounds;
        let lo = |v: u32, n: u32| ((v as f64 * factor).floor() as u32).min(n - 1);
        let hi = |v: u32, n: u32, lo: u32| ((v as f64 * factor).ceil() as u32).clamp(lo + 1, n);
        let (bx0, by0) = (lo(x0, to.0), lo(y0, to.1));
        Crop {
            rect: Rect {
                x: self.rect.x * factor,
                y: self.rect.y * factor,
                w: self.rect.w * factor,
                h: self.rect.h * factor,
            },
            bounds: (bx0, by0, hi(x1, to.0, bx0), hi(y1, to.1, by0)),
            flip: self.flip,
        }
    }
}

impl Crop {
    /// The pixels the filter may read, `(x0, y0, x1, y1)` (exclusive ends): `bounds` cut to the
    /// rectangle widened by the triangle filter's support (`max(1, scale)` source pixels) plus 2.
    fn needed(&self, s: u32) -> (u32, u32, u32, u32) {
        let (b0, b1, b2, b3) = self.bounds;
        let sx = (self.rect.w / s as f64).max(1.0) + 2.0;
        let sy = (self.rect.h / s as f64).max(1.0) + 2.0;
        let lo = |v: f64, b: u32| (v.floor().max(0.0) as u32).max(b);
        let hi = |v: f64, b: u32, lo: u32| (v.ceil().max(0.0) as u32).min(b).max(lo + 1);
        let (x0, y0) = (lo(self.rect.x - sx, b0), lo(self.rect.y - sy, b1));
        let x1 = hi(self.rect.x + self.rect.w + sx, b2, x0);
        let y1 = hi(self.rect.y + self.rect.h + sy, b3, y0);
        (x0, y0, x1, y1)
    }

    /// The same crop in the part at `offset` of the image, of size `dims` (bounds clamped to it).
    fn shifted(&self, offset: (u32, u32), dims: (u32, u32)) -> Crop {
        let (ox, oy) = offset;
        let (b0, b1, b2, b3) = self.bounds;
        let x0 = b0.saturating_sub(ox).min(dims.0 - 1);
        let y0 = b1.saturating_sub(oy).min(dims.1 - 1);
        Crop {
            rect: Rect {
                x: self.rect.x - ox as f64,
                y: self.rect.y - oy as f64,
                ..self.rect
            },
            bounds: (
                x0,
                y0,
                b2.saturating_sub(ox).clamp(x0 + 1, dims.0),
                b3.saturating_sub(oy).clamp(y0 + 1, dims.1),
            ),
            flip: self.flip,
        }
    }
}

/// RandomResizedCrop + flip of a `width x height` image (draws from `rng` in a fixed order:
/// crop, then flip), or the eval crop without `cfg.augment`.
fn train_crop(width: u32, height: u32, cfg: &Config, rng: &mut impl rand::Rng) -> Crop {
    if !cfg.augment {
        return eval_crop(width, height, cfg);
    }
    let (x, y, w, h) = random_resized_crop_params(width, height, (cfg.min_crop_scale, 1.0), rng);
    let flip = rng.random_bool(0.5);
    Crop {
        rect: Rect {
            x: x as f64,
            y: y as f64,
            w: w as f64,
            h: h as f64,
        },
        bounds: (x, y, x + w, y + h),
        flip,
    }
}

/// Resize-shorter-side + centre crop of a `width x height` image as a source rectangle.
fn eval_crop(width: u32, height: u32, cfg: &Config) -> Crop {
    let s = cfg.image_size as f64;
    let (w, h) = (width as f64, height as f64);
    let r = cfg.eval_resize_px().max(cfg.image_size) as f64;
    let (rw, rh) = if w <= h {
        (r, (r * h / w).floor().max(r))
    } else {
        ((r * w / h).floor().max(r), r)
    };
    let left = ((rw - s) / 2.0).round();
    let top = ((rh - s) / 2.0).round();
    let (sx, sy) = (w / rw, h / rh); // source pixels per resized pixel
    Crop {
        rect: Rect {
            x: left * sx,
            y: top * sy,
            w: s * sx,
            h: s * sy,
        },
        bounds: (0, 0, width, height),
        flip: false,
    }
}

/// Resamples `crop.rect` of `img` to `s x s` into `out` `[3, s, s]` (CHW), normalised
/// `(x/255 - mean) / std`, mirrored if `crop.flip`; the filter reads only pixels inside
/// `crop.bounds`. The resize is `fast_image_resize`'s convolution with PIL's bilinear
/// (triangle) filter, widened by the scale factor when shrinking (antialiased, as
/// `Image.resize(BILINEAR)` and so torchvision's PIL path), 8-bit output as PIL's.
///
/// Panics if `out.len() != 3*s*s` (a caller bug).
fn resample(img: &RgbImage, crop: &Crop, cfg: &Config, out: &mut [f32]) {
    use fast_image_resize as fr;
    let s = cfg.image_size;
    let plane = (s * s) as usize;
    assert_eq!(out.len(), 3 * plane, "output buffer must be [3, {s}, {s}]");
    let (x0, y0, x1, y1) = crop.bounds;
    // Crops are built inside the image (Crop::scaled clamps); the clamps here only keep the
    // library's own bounds checks from ever failing on float rounding.
    let (x1, y1) = (x1.min(img.width()), y1.min(img.height()));
    let (x0, y0) = (x0.min(x1 - 1), y0.min(y1 - 1));
    let (vw, vh) = ((x1 - x0) as f64, (y1 - y0) as f64);
    let left = (crop.rect.x - x0 as f64).clamp(0.0, vw - 1e-6);
    let top = (crop.rect.y - y0 as f64).clamp(0.0, vh - 1e-6);
    let width = crop.rect.w.clamp(1e-6, vw - left);
    let height = crop.rect.h.clamp(1e-6, vh - top);
    let view = fr::images::CroppedImage::new(img, x0, y0, x1 - x0, y1 - y0)
        .expect("crop bounds inside the image");
    let mut dst = fr::images::Image::new(s, s, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear))
        .crop(left, top, width, height);
    fr::Resizer::new()
        .resize(&view, &mut dst, &options)
        .expect("RGB8 to RGB8 resize of an in-bounds box");
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * cfg.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| -cfg.mean[c] / cfg.std[c]);
    let s = s as usize;
    for (y, row) in dst.buffer().chunks_exact(3 * s).enumerate() {
        for (x, p) in row.chunks_exact(3).enumerate() {
            let i = y * s + if crop.flip { s - 1 - x } else { x };
            for c in 0..3 {
                out[c * plane + i] = p[c] as f32 * scale[c] + shift[c];
            }
        }
    }
}

/// Decode + crop: `crop_for(width, height)` gets the full-size, oriented dimensions.
fn decode_cropped(
    bytes: &[u8],
    cfg: &Config,
    crop_for: impl FnOnce(u32, u32) -> Crop,
    out: &mut [f32],
) -> Result<()> {
    let opts = DecodeOptions::from(cfg);
    let (img, crop) = if matches!(sniff(bytes), Sniffed::Jpeg) {
        let jpeg = Jpeg::open(bytes, &opts)?;
        let full = jpeg.dimensions();
        let crop = crop_for(full.0, full.1);
        let eighths = if cfg.jpeg_dct_scaling {
            crop.dct_eighths(cfg.image_size)
        } else {
            8
        };
        // The part the filter reads, in the image at eighths/8 scale: a partial decode.
        let at = |e: u32| ((full.0 * e).div_ceil(8), (full.1 * e).div_ceil(8));
        let wanted = crop.scaled(eighths as f64 / 8.0, at(eighths));
        let d = jpeg.decode(eighths, Some(wanted.needed(cfg.image_size)))?;
        // Map by what came back (the fallback decodes everything at full size).
        let e = (d.factor * 8.0).round() as u32;
        let crop = crop
            .scaled(d.factor, at(e))
            .shifted(d.offset, d.img.dimensions());
        (d.img, crop)
    } else {
        let img = decode_rgb(bytes, &opts)?;
        let crop = crop_for(img.width(), img.height());
        (img, crop)
    };
    resample(&img, &crop, cfg, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::image::Rgb;
    use rand::SeedableRng;

    fn cfg(s: u32) -> Config {
        Config::new("unused", s)
    }

    #[test]
    fn rrc_params_stay_inside_and_respect_scale_and_ratio() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for &(w, h) in &[
            (64u32, 64u32),
            (500, 375),
            (375, 500),
            (10, 300),
            (300, 10),
            (1, 1),
        ] {
            for _ in 0..500 {
                let (x, y, cw, ch) = random_resized_crop_params(w, h, (0.25, 1.0), &mut rng);
                assert!(
                    cw > 0 && ch > 0 && x + cw <= w && y + ch <= h,
                    "{w}x{h}: {x},{y},{cw},{ch}"
                );
                // Not a fallback: area and ratio within range (up to rounding).
                let normal = w as f64 / (h as f64) > 0.75 && (w as f64 / h as f64) < 4.0 / 3.0;
                if normal && w >= 64 {
                    let frac = (cw * ch) as f64 / (w * h) as f64;
                    assert!(frac > 0.2 && frac <= 1.0, "{frac}");
                    let r = cw as f64 / ch as f64;
                    assert!(r > 0.7 && r < 1.43, "{r}");
                }
            }
        }
    }

    #[test]
    fn eval_shape_and_constant_image_normalisation() {
        let c = cfg(8);
        let img = RgbImage::from_pixel(13, 29, Rgb([255, 0, 128]));
        let mut out = vec![f32::NAN; 3 * 8 * 8];
        eval_transform(&img, &c, &mut out);
        let expect = |ch: usize, v: f32| (v / 255.0 - c.mean[ch]) / c.std[ch];
        for (i, v) in out.iter().enumerate() {
            let ch = i / 64;
            let want = expect(ch, [255.0, 0.0, 128.0][ch]);
            assert!((v - want).abs() < 1e-4, "ch {ch}: {v} vs {want}");
        }
    }

    #[test]
    fn identity_resample_is_exact_and_chw() {
        // eval with eval_resize == image_size on a square image of that size: pixels pass through.
        let mut c = cfg(4);
        c.eval_resize = Some(4);
        c.mean = [0.0; 3];
        c.std = [1.0; 3];
        let img = RgbImage::from_fn(4, 4, |x, y| Rgb([(x * 10) as u8, (y * 10) as u8, 7]));
        let mut out = vec![0f32; 48];
        eval_transform(&img, &c, &mut out);
        for y in 0..4 {
            for x in 0..4 {
                assert!((out[y * 4 + x] * 255.0 - (x * 10) as f32).abs() < 1e-3);
                assert!((out[16 + y * 4 + x] * 255.0 - (y * 10) as f32).abs() < 1e-3);
                assert!((out[32 + y * 4 + x] * 255.0 - 7.0).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn eval_centre_crop_takes_the_middle() {
        // 4x8 (w x h) image, top half black, bottom half white, image_size 4, resize 4:
        // resized stays 4x8, centre crop rows 2..6 -> half black, half white.
        let mut c = cfg(4);
        c.eval_resize = Some(4);
        c.mean = [0.0; 3];
        c.std = [1.0; 3];
        let img = RgbImage::from_fn(4, 8, |_, y| if y < 4 { Rgb([0; 3]) } else { Rgb([255; 3]) });
        let mut out = vec![0f32; 48];
        eval_transform(&img, &c, &mut out);
        assert!(out[0] < 1e-3 && out[4] < 1e-3); // rows 0,1 of the crop = source rows 2,3
        assert!(out[8] > 0.999 && out[12] > 0.999);
    }

    #[test]
    fn flip_mirrors_and_no_augment_equals_eval() {
        let img = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 0]));
        let mut c = cfg(16);
        c.augment = false;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut a = vec![0f32; 3 * 256];
        let mut b = vec![0f32; 3 * 256];
        train_transform(&img, &c, &mut rng, &mut a);
        eval_transform(&img, &c, &mut b);
        assert_eq!(a, b);
        // Full-image crop with min scale 1 and a square image: flips show up as mirrored rows.
        c.augment = true;
        c.min_crop_scale = 1.0;
        let mut seen = [false; 2];
        for seed in 0..20 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            train_transform(&img, &c, &mut rng, &mut a);
            let increasing = a[15] > a[0];
            seen[increasing as usize] = true;
        }
        assert_eq!(seen, [true, true], "both flipped and unflipped crops occur");
    }

    #[test]
    fn degenerate_sizes_resample_without_panicking() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let c = cfg(8);
        let mut out = vec![f32::NAN; 3 * 64];
        for (w, h) in [(1, 1), (1, 300), (300, 1), (2, 3), (7, 8)] {
            let img = RgbImage::from_pixel(w, h, Rgb([10, 20, 30]));
            for _ in 0..20 {
                train_transform(&img, &c, &mut rng, &mut out);
                assert!(out.iter().all(|v| v.is_finite()), "{w}x{h}");
            }
            eval_transform(&img, &c, &mut out);
            let want = (10.0 / 255.0 - c.mean[0]) / c.std[0];
            assert!((out[0] - want).abs() < 1e-4, "{w}x{h}: {}", out[0]);
        }
    }

    #[test]
    fn downscale_is_antialiased() {
        // 1-pixel checkerboard shrunk 8x averages to grey, not to aliased stripes.
        let img = RgbImage::from_fn(64, 64, |x, y| {
            if (x + y) % 2 == 0 {
                Rgb([255; 3])
            } else {
                Rgb([0; 3])
            }
        });
        let mut c = cfg(8);
        c.eval_resize = Some(8);
        c.mean = [0.0; 3];
        c.std = [1.0; 3];
        let mut out = vec![0f32; 3 * 64];
        eval_transform(&img, &c, &mut out);
        for v in out {
            assert!((v - 0.5).abs() < 0.05, "{v}");
        }
    }

    #[test]
    fn dct_scale_keeps_the_crop_at_least_output_size() {
        let crop = |w: f64, h: f64| Crop {
            rect: Rect {
                x: 3.0,
                y: 5.0,
                w,
                h,
            },
            bounds: (3, 5, 3 + w as u32, 5 + h as u32),
            flip: false,
        };
        // (w, h) -> eighths for s = 224: 1/8 needs 1792, 1/4 896, 1/2 448 per side.
        for ((w, h), e) in [
            ((1792.0, 2000.0), 1),
            ((1791.0, 2000.0), 2),
            ((896.0, 896.0), 2),
            ((2000.0, 895.0), 4),
            ((448.0, 448.0), 4),
            ((447.9, 1000.0), 8),
            ((100.0, 100.0), 8),
        ] {
            assert_eq!(crop(w, h).dct_eighths(224), e, "{w}x{h}");
        }
    }

    #[test]
    fn scaled_crop_maps_and_clamps() {
        let c = Crop {
            rect: Rect {
                x: 10.0,
                y: 20.0,
                w: 500.0,
                h: 400.0,
            },
            bounds: (10, 20, 510, 420),
            flip: true,
        };
        assert_eq!(c.scaled(1.0, (600, 500)), c);
        // a 525x421 image at 1/2 decodes to 263x211
        let h = Crop {
            bounds: (0, 1, 525, 421),
            ..c
        }
        .scaled(0.5, (263, 211));
        assert_eq!(
            h.rect,
            Rect {
                x: 5.0,
                y: 10.0,
                w: 250.0,
                h: 200.0
            }
        );
        assert_eq!(h.bounds, (0, 0, 263, 211));
        assert!(h.flip);
        assert_eq!(c.scaled(0.25, (150, 125)).bounds, (2, 5, 128, 105));
    }

    #[test]
    fn partial_decode_equals_the_same_part_of_the_whole_decode() {
        let img = RgbImage::from_fn(300, 200, |x, y| {
            Rgb([
                (x * 7 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        let mut jpg = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut jpg), ::image::ImageFormat::Jpeg)
            .unwrap();
        for eighths in [8, 4, 2, 1] {
            let (whole, at) = decode_turbo(&jpg, eighths, None).unwrap();
            assert_eq!(at, (0, 0));
            assert_eq!(whole.width(), (300 * eighths).div_ceil(8));
            let region = (
                whole.width() / 2,
                whole.height() / 3,
                whole.width() * 3 / 4,
                whole.height() / 2,
            );
            let (part, (ox, oy)) = decode_turbo(&jpg, eighths, Some(region)).unwrap();
            assert!(
                ox <= region.0 && oy <= region.1,
                "{eighths}/8: at {ox},{oy}"
            );
            assert!(ox + part.width() >= region.2 && oy + part.height() >= region.3);
            if eighths >= 4 {
                assert!(part.width() < whole.width() && part.height() < whole.height());
            }
            for (x, y, p) in part.enumerate_pixels() {
                assert_eq!(p, whole.get_pixel(ox + x, oy + y), "{eighths}/8 at {x},{y}");
            }
        }
    }

    #[test]
    fn sniffing_and_errors() {
        assert!(decode_rgb(b"", &DecodeOptions::new(100))
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(decode_rgb(b"GIF89a....", &DecodeOptions::new(100))
            .unwrap_err()
            .to_string()
            .contains("GIF"));
        // PNG round trip through the encoder, including grey -> RGB.
        let grey = ::image::GrayImage::from_pixel(5, 3, ::image::Luma([77]));
        let mut png = Vec::new();
        DynamicImage::ImageLuma8(grey)
            .write_to(&mut Cursor::new(&mut png), ::image::ImageFormat::Png)
            .unwrap();
        let rgb = decode_rgb(&png, &DecodeOptions::new(100)).unwrap();
        assert_eq!(rgb.dimensions(), (5, 3));
        assert_eq!(rgb.get_pixel(2, 1).0, [77, 77, 77]);
        let err = decode_rgb(&png, &DecodeOptions::new(14))
            .unwrap_err()
            .to_string();
        assert!(err.contains("image 5x3 exceeds max_pixels (14)"), "{err}");
    }

    #[test]
    fn truncated_jpeg_is_rejected_at_every_cut() {
        let img = RgbImage::from_fn(16, 16, |x, y| Rgb([(x * 16) as u8, (y * 16) as u8, 99]));
        let mut jpg = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut jpg), ::image::ImageFormat::Jpeg)
            .unwrap();
        assert_eq!(
            decode_rgb(&jpg, &DecodeOptions::new(1000))
                .unwrap()
                .dimensions(),
            (16, 16)
        );
        for cut in 0..jpg.len() - 2 {
            assert!(
                decode_rgb(&jpg[..cut], &DecodeOptions::new(1000)).is_err(),
                "cut at {cut} accepted"
            );
        }
    }
}
