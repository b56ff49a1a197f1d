//! Copies that write around the caches (non-temporal stores), for collective outputs too big
//! to stay cached anyway. A plain store to a line that is not cached first reads it from
//! memory (write-allocate), so copying S bytes into a cold buffer moves 3·S through memory;
//! streaming stores move 2·S and leave the cache to the data that is reused (the shared
//! halves). glibc's memcpy streams too, but only for single calls above a fraction of the
//! L3, and the collectives copy in pieces of one half (1 MiB), so they never got it.
//!
//! Streaming stores are weakly ordered: `copy` ends with a store fence, so whatever a rank
//! publishes after it (a round counter, a completion flag) is ordered after the data.

/// `dst = src`, streaming (`stream`) or through the caches.
pub fn copy<T: Copy>(dst: &mut [T], src: &[T], stream: bool) {
    assert_eq!(dst.len(), src.len(), "stream::copy: lengths differ");
    // SAFETY: two distinct slices of equal length (a &mut never aliases a &).
    unsafe { copy_raw(dst.as_mut_ptr(), src.as_ptr(), src.len(), stream) }
}

/// `n` elements from `src` to `dst`, which must not overlap.
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping`.
pub unsafe fn copy_raw<T: Copy>(dst: *mut T, src: *const T, n: usize, stream: bool) {
    let bytes = n * size_of::<T>();
    // Below a few lines, the fence costs more than the write-allocate it saves.
    if !stream || bytes < 4096 {
        std::ptr::copy_nonoverlapping(src, dst, n);
        return;
    }
    copy_bytes_nt(dst as *mut u8, src as *const u8, bytes);
    fence();
}

/// Orders every streaming store before the stores that follow (publishing a flag).
pub fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no operands; SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Streaming copy of `bytes` bytes without the closing fence (for loops of small blocks that
/// fence once at the end).
///
/// # Safety
/// As `std::ptr::copy_nonoverlapping`.
pub(crate) unsafe fn stream_raw<T: Copy>(dst: *mut T, src: *const T, n: usize) {
    copy_bytes_nt(dst as *mut u8, src as *const u8, n * size_of::<T>())
}

#[cfg(target_arch = "x86_64")]
unsafe fn copy_bytes_nt(dst: *mut u8, src: *const u8, bytes: usize) {
    use std::arch::x86_64::*;
    // Head up to the first 64-byte boundary of dst through the cache: streaming stores
    // must be aligned.
    let head = dst.align_offset(64).min(bytes);
    std::ptr::copy_nonoverlapping(src, dst, head);
    let body = (bytes - head) / 64 * 64;
    if std::arch::is_x86_feature_detected!("avx") {
        stream_avx(dst.add(head), src.add(head), body);
    } else {
        // SSE2 is part of x86-64.
        let mut i = 0;
        while i < body {
            for k in 0..4 {
                let v = _mm_loadu_si128(src.add(head + i + 16 * k) as *const __m128i);
                _mm_stream_si128(dst.add(head + i + 16 * k) as *mut __m128i, v);
            }
            i += 64;
        }
    }
    let tail = head + body;
    std::ptr::copy_nonoverlapping(src.add(tail), dst.add(tail), bytes - tail);
}

/// Two 32-byte streaming stores per line, four lines per iteration; `dst` 64-byte aligned,
/// `bytes` a multiple of 64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn stream_avx(dst: *mut u8, src: *const u8, bytes: usize) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 256 <= bytes {
        let mut v = [_mm256_setzero_si256(); 8];
        for (k, v) in v.iter_mut().enumerate() {
            *v = _mm256_loadu_si256(src.add(i + 32 * k) as *const __m256i);
        }
        for (k, v) in v.iter().enumerate() {
            _mm256_stream_si256(dst.add(i + 32 * k) as *mut __m256i, *v);
        }
        i += 256;
    }
    while i < bytes {
        let a = _mm256_loadu_si256(src.add(i) as *const __m256i);
        let b = _mm256_loadu_si256(src.add(i + 32) as *const __m256i);
        _mm256_stream_si256(dst.add(i) as *mut __m256i, a);
        _mm256_stream_si256(dst.add(i + 32) as *mut __m256i, b);
        i += 64;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_bytes_nt(dst: *mut u8, src: *const u8, bytes: usize) {
    std::ptr::copy_nonoverlapping(src, dst, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_copy_equals_plain_copy_at_every_alignment_and_length() {
        let src: Vec<u8> = (0..20000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for dst_off in [0, 1, 7, 31, 32, 63] {
            for src_off in [0, 3, 64] {
                for len in [0, 1, 4095, 4096, 4097, 4160, 5000, 12345, 19000] {
                    let mut dst = vec![0xAAu8; 20064];
                    copy(
                        &mut dst[dst_off..dst_off + len],
                        &src[src_off..src_off + len],
                        true,
                    );
                    assert_eq!(&dst[dst_off..dst_off + len], &src[src_off..src_off + len]);
                    assert!(dst[..dst_off].iter().all(|&b| b == 0xAA), "{dst_off} {len}");
                    assert!(
                        dst[dst_off + len..].iter().all(|&b| b == 0xAA),
                        "{dst_off} {len}"
                    );
                }
            }
        }
        let s: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5).collect();
        let mut d = vec![0f32; 3000];
        copy(&mut d, &s, true);
        assert_eq!(d, s);
    }
}
