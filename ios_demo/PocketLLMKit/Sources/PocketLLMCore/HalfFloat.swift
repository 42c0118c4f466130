/// IEEE 754 binary16 <-> Float conversion on bit patterns. Core ML returns fp16 logits; Swift's Float16 type does not
/// exist on x86-64 macOS, so the engine reads the raw UInt16 and converts here (exact for every finite value, inf and
/// NaN).
public enum HalfFloat {
    public static func toFloat(_ bits: UInt16) -> Float {
        let sign = UInt32(bits & 0x8000) << 16
        let exponent = UInt32(bits >> 10) & 0x1f
        var mantissa = UInt32(bits) & 0x3ff
        if exponent == 0x1f {  // inf / NaN
            return Float(bitPattern: sign | 0x7f80_0000 | (mantissa << 13))
        }
        if exponent != 0 {  // normal
            return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
        }
        if mantissa == 0 { return Float(bitPattern: sign) }  // +-0
        // subnormal: shift the mantissa up until its leading 1 reaches the implicit position
        var e: UInt32 = 113
        while mantissa & 0x400 == 0 {
            mantissa <<= 1
            e -= 1
        }
        mantissa &= 0x3ff
        return Float(bitPattern: sign | (e << 23) | (mantissa << 13))
    }

    /// Round to nearest even, as hardware conversion does; overflow becomes inf.
    public static func fromFloat(_ value: Float) -> UInt16 {
        let x = value.bitPattern
        let sign = UInt16((x >> 16) & 0x8000)
        let exponent = Int((x >> 23) & 0xff)
        let mantissa = x & 0x7f_ffff
        if exponent == 0xff {  // inf / NaN
            return sign | 0x7c00 | (mantissa != 0 ? 0x200 : 0)
        }
        let e = exponent - 127 + 15
        if e >= 0x1f { return sign | 0x7c00 }  // overflow
        if e <= 0 {  // subnormal or zero in half precision
            if e < -10 { return sign }
            let m = mantissa | 0x80_0000  // with the implicit 1
            let shift = UInt32(14 - e)
            var half = m >> shift
            let remainder = m & ((1 << shift) - 1)
            let halfway = UInt32(1) << (shift - 1)
            if remainder > halfway || (remainder == halfway && half & 1 == 1) { half += 1 }
            return sign | UInt16(half)
        }
        var half = UInt32(e) << 10 | (mantissa >> 13)
        let remainder = mantissa & 0x1fff
        if remainder > 0x1000 || (remainder == 0x1000 && half & 1 == 1) { half += 1 }  // may carry into inf: correct
        return sign | UInt16(half)
    }
}
