//! Image work the gateway does itself: shrinking results to fit inline in a tool
//! result, keying a flat sprite background out to transparency, and snapping pixel
//! art to its grid. Everything else about an output is left as the generator made it.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, ImageFormat, Rgba, RgbaImage};

use crate::error::ToolError;

/// An image ready to travel inline.
#[derive(Debug, Clone)]
pub struct Inline {
    pub data: Vec<u8>,
    pub media_type: String,
    pub width: u32,
    pub height: u32,
    /// True when it is not the original bytes (scaled or re-encoded).
    pub reduced: bool,
}

/// Base64 takes 4 bytes for every 3.
pub fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Media types the gateway can decode.
pub fn is_still_image(media_type: &str) -> bool {
    matches!(media_type, "image/png" | "image/jpeg" | "image/webp")
}

fn format_of(media_type: &str) -> Option<ImageFormat> {
    match media_type {
        "image/png" | "image/apng" => Some(ImageFormat::Png),
        "image/jpeg" => Some(ImageFormat::Jpeg),
        "image/webp" => Some(ImageFormat::WebP),
        _ => None,
    }
}

fn decode(data: &[u8], media_type: &str) -> Result<DynamicImage, ToolError> {
    let format = format_of(media_type)
        .ok_or_else(|| ToolError::Image(format!("cannot decode {media_type}")))?;
    image::load_from_memory_with_format(data, format).map_err(|e| ToolError::Image(e.to_string()))
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Result<Vec<u8>, ToolError> {
    let mut out = Cursor::new(Vec::new());
    match format {
        ImageFormat::Jpeg => {
            let rgb = DynamicImage::ImageRgb8(img.to_rgb8());
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85);
            rgb.write_with_encoder(enc)
        }
        other => img.write_to(&mut out, other),
    }
    .map_err(|e| ToolError::Image(e.to_string()))?;
    Ok(out.into_inner())
}

/// Returns the image as it may travel inline within `budget` bytes of base64: the
/// original when it fits, else scaled down and re-encoded (JPEG, or PNG when it has
/// transparency). `None` when even a 32-pixel thumbnail would not fit.
pub fn fit_inline(
    data: &[u8],
    media_type: &str,
    budget: usize,
) -> Result<Option<Inline>, ToolError> {
    let img = decode(data, media_type)?;
    let (width, height) = img.dimensions();
    if base64_len(data.len()) <= budget && is_still_image(media_type) {
        return Ok(Some(Inline {
            data: data.to_vec(),
            media_type: media_type.to_string(),
            width,
            height,
            reduced: false,
        }));
    }
    let transparent = img.color().has_alpha();
    let (format, out_type) = if transparent {
        (ImageFormat::Png, "image/png")
    } else {
        (ImageFormat::Jpeg, "image/jpeg")
    };
    // Start at the scale the byte ratio suggests, then shrink by a quarter until it fits.
    let mut scale = if base64_len(data.len()) <= budget {
        1.0
    } else {
        (budget as f64 / base64_len(data.len()) as f64)
            .sqrt()
            .clamp(0.05, 1.0)
    };
    loop {
        let w = ((width as f64 * scale).round() as u32).max(1);
        let h = ((height as f64 * scale).round() as u32).max(1);
        if w.max(h) < 32 {
            return Ok(None);
        }
        let resized = if scale < 1.0 {
            img.resize(w, h, FilterType::Triangle)
        } else {
            img.clone()
        };
        let bytes = encode(&resized, format)?;
        if base64_len(bytes.len()) <= budget {
            return Ok(Some(Inline {
                data: bytes,
                media_type: out_type.into(),
                width: resized.width(),
                height: resized.height(),
                reduced: true,
            }));
        }
        scale *= 0.75;
    }
}

/// Width and height of an image, when it can be decoded.
pub fn dimensions(data: &[u8], media_type: &str) -> Option<(u32, u32)> {
    let format = format_of(media_type)?;
    image::ImageReader::with_format(Cursor::new(data), format)
        .into_dimensions()
        .ok()
}

/// Keys out a flat background: pixels connected to the border whose colour is close
/// to the border's most common colour become transparent. Returns a PNG.
pub fn remove_background(data: &[u8], media_type: &str) -> Result<Vec<u8>, ToolError> {
    let mut img = decode(data, media_type)?.to_rgba8();
    let key = border_colour(&img);
    let (w, h) = img.dimensions();
    let close = |p: &Rgba<u8>| {
        p[3] > 0
            && (0..3)
                .map(|c| (p[c] as i32 - key[c] as i32).abs())
                .sum::<i32>()
                <= 48
    };
    let mut seen = vec![false; (w * h) as usize];
    let mut stack: Vec<(u32, u32)> = Vec::new();
    for x in 0..w {
        stack.push((x, 0));
        stack.push((x, h - 1));
    }
    for y in 0..h {
        stack.push((0, y));
        stack.push((w - 1, y));
    }
    while let Some((x, y)) = stack.pop() {
        let i = (y * w + x) as usize;
        if seen[i] || !close(img.get_pixel(x, y)) {
            continue;
        }
        seen[i] = true;
        img.get_pixel_mut(x, y)[3] = 0;
        if x > 0 {
            stack.push((x - 1, y));
        }
        if y > 0 {
            stack.push((x, y - 1));
        }
        if x + 1 < w {
            stack.push((x + 1, y));
        }
        if y + 1 < h {
            stack.push((x, y + 1));
        }
    }
    encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png)
}

/// The most common colour on the image's border, in coarse buckets.
fn border_colour(img: &RgbaImage) -> Rgba<u8> {
    let (w, h) = img.dimensions();
    let mut counts = std::collections::HashMap::new();
    let border = (0..w)
        .flat_map(|x| [(x, 0), (x, h - 1)])
        .chain((0..h).flat_map(|y| [(0, y), (w - 1, y)]));
    for (x, y) in border {
        let p = img.get_pixel(x, y);
        counts
            .entry([p[0] / 16, p[1] / 16, p[2] / 16])
            .or_insert((0u32, *p))
            .0 += 1;
    }
    counts
        .into_values()
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
        .unwrap_or(Rgba([255, 255, 255, 255]))
}

/// Snaps an image to a grid of `cell`-pixel squares (nearest-neighbour both ways),
/// so pixel-art styles come out as real pixel art. Keeps the format (PNG).
pub fn pixelate(data: &[u8], media_type: &str, cell: u32) -> Result<Vec<u8>, ToolError> {
    let img = decode(data, media_type)?;
    let (w, h) = img.dimensions();
    let small = img.resize_exact((w / cell).max(1), (h / cell).max(1), FilterType::Triangle);
    let big = small.resize_exact(w, h, FilterType::Nearest);
    encode(&big, ImageFormat::Png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy_png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbaImage::from_fn(w, h, |x, y| {
            let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) as u8;
            Rgba([v, v.rotate_left(3), v.rotate_left(5), 255])
        });
        encode(
            &DynamicImage::ImageRgba8(img).to_rgb8().into(),
            ImageFormat::Png,
        )
        .unwrap()
    }

    #[test]
    fn small_images_travel_as_they_are_and_big_ones_shrink_under_the_budget() {
        let small = noisy_png(32, 32);
        let inline = fit_inline(&small, "image/png", 1 << 20).unwrap().unwrap();
        assert!(!inline.reduced);
        assert_eq!(inline.data, small);

        let big = noisy_png(512, 512);
        let budget = 40_000;
        assert!(base64_len(big.len()) > budget);
        let inline = fit_inline(&big, "image/png", budget).unwrap().unwrap();
        assert!(inline.reduced);
        assert!(base64_len(inline.data.len()) <= budget);
        assert_eq!(inline.media_type, "image/jpeg");
        assert!(inline.width < 512 && inline.width == inline.height);
        assert_eq!(
            dimensions(&inline.data, "image/jpeg"),
            Some((inline.width, inline.height))
        );
        assert!(fit_inline(&big, "image/png", 100).unwrap().is_none());
    }

    #[test]
    fn a_flat_background_becomes_transparent_but_the_subject_stays() {
        let img = RgbaImage::from_fn(40, 40, |x, y| {
            if (10..30).contains(&x) && (10..30).contains(&y) {
                Rgba([200, 20, 20, 255])
            } else {
                Rgba([250, 250, 250, 255])
            }
        });
        let png = encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png).unwrap();
        let out = image::load_from_memory(&remove_background(&png, "image/png").unwrap())
            .unwrap()
            .to_rgba8();
        assert_eq!(out.get_pixel(0, 0)[3], 0);
        assert_eq!(out.get_pixel(20, 20), &Rgba([200, 20, 20, 255]));
    }

    #[test]
    fn pixelation_makes_uniform_cells() {
        let out = pixelate(&noisy_png(64, 64), "image/png", 8).unwrap();
        let img = image::load_from_memory(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        assert_eq!(img.get_pixel(0, 0), img.get_pixel(7, 7));
    }
}
