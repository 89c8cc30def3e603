//! Image reduction: the original system's "images above the limit are reduced
//! before upload", done on the client before encryption.
//!
//! Data flow. [`reduce`] gets a saved image's plaintext bytes (already in
//! memory), decodes them with the `image` crate under strict limits (so a
//! decompression bomb is refused, not obeyed), turns the pixels upright by the
//! EXIF orientation, resizes so the longest edge is the policy's limit (Lanczos3,
//! aspect ratio kept) and encodes in the same format: JPEG at the policy's
//! quality, PNG and WebP losslessly. The result replaces the original only if it
//! is smaller. Anything unexpected (not decodable, not the format its name says,
//! over the limits) leaves the bytes as they are: reduction never loses data.
//! It is CPU work, run on a blocking thread by the caller.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::policy::ImageFormat;

/// Largest width or height decoded.
pub const MAX_DIMENSION: u32 = 20_000;
/// Most memory the decoder may allocate.
pub const MAX_DECODE_ALLOC: u64 = 512 << 20;

/// What became of an image.
#[derive(Debug, PartialEq, Eq)]
pub enum Reduced {
    /// The smaller image.
    Smaller {
        /// Encoded in the original's format.
        bytes: Vec<u8>,
        /// New width.
        width: u32,
        /// New height.
        height: u32,
    },
    /// Left as it was, and why (already small enough, or the result was not smaller).
    Unchanged(String),
}

/// Reduces `bytes`, an image in `format` (from its name), to at most
/// `max_edge` pixels on its longest side. `Err` says why it could not be
/// processed; the caller then keeps the bytes unchanged.
pub fn reduce(bytes: &[u8], format: ImageFormat, max_edge: u32, jpeg_quality: u8) -> Result<Reduced, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    let found = reader.format().ok_or("not a recognised image")?;
    let expected = match format {
        ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        ImageFormat::Png => image::ImageFormat::Png,
        ImageFormat::Webp => image::ImageFormat::WebP,
    };
    if found != expected {
        return Err(format!("its content is {found:?}, not what its name says ({expected:?})"));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DIMENSION);
    limits.max_image_height = Some(MAX_DIMENSION);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (w, h) = decoder.dimensions();
    // Checked before decoding the pixels: a small file with huge dimensions
    // would otherwise allocate them all.
    if w.max(h) <= max_edge {
        return Ok(Reduced::Unchanged(format!("{w}x{h} is within {max_edge} pixels")));
    }
    let orientation = decoder.orientation().map_err(|e| e.to_string())?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    img.apply_orientation(orientation);
    let small = img.resize(max_edge, max_edge, image::imageops::FilterType::Lanczos3);
    wipe(img);
    let (width, height) = (small.width(), small.height());
    let mut out = Vec::new();
    let encoded = match format {
        ImageFormat::Jpeg => {
            let rgb = DynamicImage::ImageRgb8(small.to_rgb8());
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, jpeg_quality);
            let r = rgb.write_with_encoder(encoder);
            wipe(rgb);
            r
        }
        ImageFormat::Png => small.write_with_encoder(image::codecs::png::PngEncoder::new(&mut out)),
        ImageFormat::Webp => {
            let rgba = DynamicImage::ImageRgba8(small.to_rgba8());
            let r = rgba.write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut out));
            wipe(rgba);
            r
        }
    };
    wipe(small);
    encoded.map_err(|e| e.to_string())?;
    if out.len() >= bytes.len() {
        return Ok(Reduced::Unchanged(format!(
            "the {width}x{height} version ({} bytes) is not smaller than the original ({} bytes)",
            out.len(),
            bytes.len()
        )));
    }
    Ok(Reduced::Smaller { bytes: out, width, height })
}

/// Overwrites decoded pixels before their memory is returned: they are
/// plaintext like any cached file content.
fn wipe(img: DynamicImage) {
    use zeroize::Zeroize;
    match img {
        DynamicImage::ImageLuma8(mut b) => b.as_mut().zeroize(),
        DynamicImage::ImageLumaA8(mut b) => b.as_mut().zeroize(),
        DynamicImage::ImageRgb8(mut b) => b.as_mut().zeroize(),
        DynamicImage::ImageRgba8(mut b) => b.as_mut().zeroize(),
        DynamicImage::ImageLuma16(mut b) => b.as_mut().zeroize(),
        DynamicImage::ImageLumaA16(mut b) => b.as_mut().zeroize(),
        DynamicImage::ImageRgb16(mut b) => b.as_mut().zeroize(),
        DynamicImage::ImageRgba16(mut b) => b.as_mut().zeroize(),
        DynamicImage::ImageRgb32F(mut b) => b.as_mut().iter_mut().for_each(|v| *v = 0.0),
        DynamicImage::ImageRgba32F(mut b) => b.as_mut().iter_mut().for_each(|v| *v = 0.0),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A photo-like test image: smooth gradients with some texture.
    pub fn photo(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            let n = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 17;
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) % 200) as u8 + n as u8])
        })
    }

    fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_large_jpeg_is_reduced_to_the_longest_edge() {
        let jpeg = encode(&photo(1600, 1200), image::ImageFormat::Jpeg);
        let Reduced::Smaller { bytes, width, height } = reduce(&jpeg, ImageFormat::Jpeg, 400, 85).unwrap()
        else {
            panic!("not reduced")
        };
        assert_eq!((width, height), (400, 300));
        let back = image::load_from_memory(&bytes).unwrap();
        assert_eq!((back.width(), back.height()), (400, 300));
        assert!(bytes.len() < jpeg.len());
    }

    #[test]
    fn png_is_reduced_losslessly_and_portrait_keeps_its_aspect() {
        let png = encode(&photo(600, 1200), image::ImageFormat::Png);
        let Reduced::Smaller { bytes, width, height } = reduce(&png, ImageFormat::Png, 300, 85).unwrap()
        else {
            panic!("not reduced")
        };
        assert_eq!((width, height), (150, 300));
        assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::Png);
    }

    #[test]
    fn webp_is_reduced_losslessly() {
        let mut out = Cursor::new(Vec::new());
        let big = DynamicImage::ImageRgb8(photo(800, 600)).to_rgba8();
        big.write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut out)).unwrap();
        let webp = out.into_inner();
        let Reduced::Smaller { bytes, width, height } = reduce(&webp, ImageFormat::Webp, 200, 85).unwrap()
        else {
            panic!("not reduced")
        };
        assert_eq!((width, height), (200, 150));
        assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::WebP);
    }

    #[test]
    fn small_broken_or_mislabelled_images_are_left_alone() {
        let small = encode(&photo(100, 80), image::ImageFormat::Jpeg);
        assert!(matches!(reduce(&small, ImageFormat::Jpeg, 400, 85).unwrap(), Reduced::Unchanged(_)));
        assert!(reduce(b"not an image at all", ImageFormat::Jpeg, 400, 85).is_err());
        let mut cut = encode(&photo(1600, 1200), image::ImageFormat::Jpeg);
        cut.truncate(200);
        assert!(reduce(&cut, ImageFormat::Jpeg, 400, 85).is_err());
        let png = encode(&photo(1600, 1200), image::ImageFormat::Png);
        let e = reduce(&png, ImageFormat::Jpeg, 400, 85).unwrap_err();
        assert!(e.contains("not what its name says"), "{e}");
    }

    #[test]
    fn a_decompression_bomb_is_refused_before_its_pixels_are_allocated() {
        // A PNG header claiming 30000 x 30000 pixels (2.7 GB of RGB) in a few bytes.
        let mut bomb = encode(&photo(16, 16), image::ImageFormat::Png);
        bomb[16..20].copy_from_slice(&30_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&30_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]); // chunk type and data of IHDR
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = reduce(&bomb, ImageFormat::Png, 400, 85).unwrap_err();
        assert!(e.contains("limit"), "{e}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 1600x1200 JPEG tagged "rotate 90 degrees" (orientation 6) is upright
        // at 1200x1600, so reduced to 300x400.
        let jpeg = encode(&photo(1600, 1200), image::ImageFormat::Jpeg);
        let tagged = with_exif_orientation(&jpeg, 6);
        let Reduced::Smaller { width, height, .. } = reduce(&tagged, ImageFormat::Jpeg, 400, 85).unwrap()
        else {
            panic!("not reduced")
        };
        assert_eq!((width, height), (300, 400));
    }

    /// Inserts an APP1 Exif segment with one Orientation entry after SOI.
    fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"MM\0\x2a\0\0\0\x08"); // big-endian TIFF, IFD at 8
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // count
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }
}
