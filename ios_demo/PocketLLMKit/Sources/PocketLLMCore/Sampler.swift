import Foundation

/// How the next token is chosen. temperature 0 = greedy (argmax); otherwise softmax(logits / temperature) restricted to
/// the smallest set of most likely tokens whose probability reaches `topP` (nucleus sampling; 1 = no restriction).
public struct SamplingSettings: Codable, Equatable, Sendable {
    public var temperature: Double
    public var topP: Double
    /// nil = a fresh random seed per generation.
    public var seed: UInt64?

    public init(temperature: Double = 0.7, topP: Double = 0.9, seed: UInt64? = nil) {
        self.temperature = temperature
        self.topP = topP
        self.seed = seed
    }

    public static let greedy = SamplingSettings(temperature: 0, topP: 1)

    public var isGreedy: Bool { !(temperature > 0) }
}

/// xoshiro256** seeded through SplitMix64: small, fast, and the same sequence on every platform for a given seed.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var s0: UInt64, s1: UInt64, s2: UInt64, s3: UInt64

    public init(seed: UInt64) {
        var x = seed
        func splitMix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s0 = splitMix()
        s1 = splitMix()
        s2 = splitMix()
        s3 = splitMix()
    }

    public mutating func next() -> UInt64 {
        let result = rotl(s1 &* 5, 7) &* 9
        let t = s1 << 17
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = rotl(s3, 45)
        return result
    }

    /// Uniform in [0, 1) with 53 random bits.
    public mutating func nextUnit() -> Double {
        Double(next() >> 11) * 0x1.0p-53
    }

    private func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }
}

/// Picks token ids from logits according to SamplingSettings.
public struct TokenSampler: Sendable {
    public let settings: SamplingSettings
    private var rng: SeededGenerator

    public init(settings: SamplingSettings) {
        self.settings = settings
        self.rng = SeededGenerator(seed: settings.seed ?? UInt64.random(in: .min ... .max))
    }

    public mutating func sample(_ logits: [Float]) -> Int {
        if settings.isGreedy || logits.count < 2 { return Self.argmax(logits) }
        let temperature = Float(settings.temperature)
        var peak = -Float.infinity
        for value in logits where value.isFinite && value > peak { peak = value }
        if !peak.isFinite { return Self.argmax(logits) }
        // Unnormalised probabilities exp((logit - max) / T); NaN and -inf logits get weight 0.
        var weights = [Double](repeating: 0, count: logits.count)
        var total = 0.0
        for (i, value) in logits.enumerated() where value.isFinite {
            let w = Double(expf((value - peak) / temperature))
            weights[i] = w
            total += w
        }
        let topP = min(max(settings.topP, 0), 1)
        if topP >= 1 { return draw(from: Array(weights.indices), weights: weights, total: total) }
        let nucleus = Self.nucleus(weights: weights, total: total, topP: topP)
        let kept = nucleus.reduce(0.0) { $0 + weights[$1] }
        return draw(from: nucleus, weights: weights, total: kept)
    }

    /// The smallest set of highest-weight indices whose weight reaches topP * total (at least one index), highest
    /// first; ties keep the lower index first. Sorts only the candidates above a cut when they already carry the mass,
    /// which is exact (every index outside the cut weighs less than every index inside it) and avoids sorting a
    /// 100k vocabulary per token.
    static func nucleus(weights: [Double], total: Double, topP: Double) -> [Int] {
        let target = topP * total
        let peak = weights.max() ?? 0
        var candidates: [Int] = []
        for cut in [1e-4, 1e-8, 0.0] {
            candidates = weights.indices.filter { weights[$0] >= peak * cut && weights[$0] > 0 }
            let mass = candidates.reduce(0.0) { $0 + weights[$1] }
            if mass >= target || cut == 0 { break }
        }
        candidates.sort { weights[$0] != weights[$1] ? weights[$0] > weights[$1] : $0 < $1 }
        var kept: [Int] = []
        var mass = 0.0
        for index in candidates {
            kept.append(index)
            mass += weights[index]
            if mass >= target { break }
        }
        return kept.isEmpty ? [Self.argmax(weights.map { Float($0) })] : kept
    }

    private mutating func draw(from indices: [Int], weights: [Double], total: Double) -> Int {
        guard total > 0, let last = indices.last else { return indices.first ?? 0 }
        var remaining = rng.nextUnit() * total
        for index in indices {
            remaining -= weights[index]
            if remaining < 0 { return index }
        }
        return last  // rounding left a sliver
    }

    /// Index of the largest finite value (the first one on ties); 0 for an empty or all-NaN input.
    public static func argmax(_ values: [Float]) -> Int {
        var best = 0
        var bestValue = -Float.infinity
        var found = false
        for (i, value) in values.enumerated() where !value.isNaN {
            if !found || value > bestValue {
                best = i
                bestValue = value
                found = true
            }
        }
        return best
    }
}
