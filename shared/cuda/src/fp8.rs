//! E4M3 on the host: the reference the FP8 kernels are checked against (`checks::fp8`), and the
//! format's arithmetic in one place. E4M3 as in the OCP 8-bit float format: 1 sign, 4 exponent
//! (bias 7) and 3 mantissa bits, no infinities, S.1111.111 NaN, largest finite value 448.

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The scale of a row whose largest magnitude is `amax`: `amax / 448`, so the row's largest value
/// lands on E4M3's largest, or 1 for a row of zeros (the rule of the device's quantisers).
pub fn row_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        amax / E4M3_MAX
    } else {
        1.0
    }
}

/// The value of an E4M3 byte (NaN for the two NaN codes).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0xf, b & 7);
    if e == 0xf && m == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 { m as f32 / 8.0 * 2f32.powi(-6) } else { (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7) };
    sign * mag
}

/// The E4M3 byte nearest to `v`, ties to the even code, saturating at ±448 (what the device's
/// quantiser computes).
pub fn f32_to_e4m3(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs().min(E4M3_MAX);
    // Codes 0..=0x7e are ordered by value: find the first at or above `a` (binary search), then
    // the nearer of it and the one below.
    let (mut lo_c, mut hi_c) = (0u8, 0x7eu8);
    while lo_c < hi_c {
        let mid = lo_c + (hi_c - lo_c) / 2;
        if e4m3_to_f32(mid) < a {
            lo_c = mid + 1;
        } else {
            hi_c = mid;
        }
    }
    let hi = hi_c;
    if hi == 0 {
        return sign;
    }
    let lo = hi - 1;
    let (dl, dh) = (a - e4m3_to_f32(lo), e4m3_to_f32(hi) - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_scale_puts_the_largest_value_on_448() {
        assert_eq!(row_scale(448.0), 1.0);
        assert_eq!(row_scale(896.0), 2.0);
        assert_eq!(f32_to_e4m3(3.5 / row_scale(3.5)), 0x7e);
        assert_eq!(row_scale(0.0), 1.0, "a row of zeros keeps a usable scale");
    }

    #[test]
    fn known_values_decode() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn every_finite_code_round_trips() {
        for b in (0u8..=0x7e).chain(0x81..=0xfe) {
            assert_eq!(f32_to_e4m3(e4m3_to_f32(b)), b, "{b:#x}");
        }
    }

    #[test]
    fn rounding_is_nearest_with_ties_to_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        // Between 1.125 (0x39) and 1.25 (0x3a): the midpoint goes to 0x3a.
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_e4m3(-1e6), 0xfe);
        // Half the smallest subnormal rounds to zero (even), a little more to the subnormal.
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0);
        assert_eq!(f32_to_e4m3(1.1 * 2f32.powi(-10)), 1);
    }
}
