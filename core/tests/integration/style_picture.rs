//! The style picture's size is judged from its header: an 11 KB PNG that claims 8192×8192
//! pixels (1 bit each) is refused before its pixels are allocated, which a counting allocator
//! in this test binary checks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use base64::Engine as _;
use sdstream::pipeline::style_image::{self, FetchPolicy, MAX_STYLE_PIXELS, StyleImage};

/// The system allocator, noting the largest single allocation made on this thread while armed.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: a thread being torn down has no locals left.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The largest single allocation `f` made on this thread, with its result.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    (out, LARGEST.with(Cell::get))
}

/// CRC-32 (IEEE) of a PNG chunk's type and data.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A 1-bit grayscale PNG of 8192×8192 black pixels. The image crate writes no 1-bit PNGs, but
/// a row of 8192 one-bit pixels is the 1024 bytes of a row of 1024 eight-bit ones: encode a
/// 1024×8192 8-bit picture unfiltered and rewrite its header to say 8192 wide, 1 bit deep.
fn one_bit_8192_png() -> Vec<u8> {
    use image::ImageEncoder as _;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let rows = vec![0u8; 1024 * 8192];
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Best, FilterType::NoFilter)
        .write_image(&rows, 1024, 8192, image::ExtendedColorType::L8)
        .expect("encode");
    // Signature (8), IHDR length (4), "IHDR" (4), then width, height, depth, colour type…
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&8192u32.to_be_bytes());
    png[24] = 1;
    assert_eq!(png[25], 0, "grayscale");
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn a_picture_over_the_pixel_bound_is_refused_from_its_header() {
    let png = one_bit_8192_png();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    // What the header says is what the old code decoded: 8192² pixels of RGB.
    let header = image::ImageReader::new(std::io::Cursor::new(&png))
        .with_guessed_format()
        .unwrap()
        .into_dimensions()
        .unwrap();
    assert_eq!(header, (8192, 8192));
    let (result, largest) = largest_allocation(|| style_image::fetch(&url, FetchPolicy::default()));
    let err = result.expect_err("refused").to_string();
    println!(
        "{} byte PNG ({} byte data: URL) claiming 8192×8192: refused, largest allocation \
         {largest} bytes (decoding would have made {} bytes of RGB); {err}",
        png.len(),
        url.len(),
        8192u64 * 8192 * 3
    );
    assert!(png.len() < 16 << 10, "{} bytes", png.len());
    assert!(
        err.contains("ip_adapter_style_image_url")
            && err.contains("8192×8192 is 67108864 pixels")
            && err.contains(&format!("more than {MAX_STYLE_PIXELS}")),
        "{err}"
    );
    // The base64 text and its bytes, nothing the size of the picture.
    assert!(largest < 1 << 20, "largest allocation {largest} bytes");

    // StyleImage::decode is bounded the same way.
    let (result, largest) = largest_allocation(|| StyleImage::decode(&png, "the picture"));
    assert!(result.is_err());
    assert!(largest < 1 << 20, "largest allocation {largest} bytes");

    // A picture within the bounds still decodes.
    let small = image::RgbImage::from_pixel(300, 200, image::Rgb([10, 20, 30]));
    let mut encoded = std::io::Cursor::new(Vec::new());
    small
        .write_to(&mut encoded, image::ImageFormat::Png)
        .unwrap();
    let picture = StyleImage::decode(encoded.get_ref(), "small").expect("decodes");
    assert_eq!(
        (picture.width, picture.height, picture.rgb[..3].to_vec()),
        (300, 200, vec![10, 20, 30])
    );
}
