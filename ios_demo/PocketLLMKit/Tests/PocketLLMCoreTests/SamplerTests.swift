import Foundation
import XCTest

@testable import PocketLLMCore

final class SamplerTests: XCTestCase {
    func testGeneratorIsXoshiro256StarStarSeededBySplitMix64() {
        // Values from a reference implementation of the two published algorithms.
        var generator = SeededGenerator(seed: 42)
        XCTAssertEqual(generator.next(), 0x1578_0b2e_0c2e_c716)
        XCTAssertEqual(generator.next(), 0x6104_d986_6d11_3a7e)
        XCTAssertEqual(generator.next(), 0xae17_5332_39e4_99a1)
        var zero = SeededGenerator(seed: 0)
        XCTAssertEqual(zero.next(), 0x99ec_5f36_cb75_f2b4)
    }

    func testGreedyIsArgmaxIgnoringNaN() {
        var sampler = TokenSampler(settings: .greedy)
        XCTAssertEqual(sampler.sample([0.5, -1, 3, 2.9]), 2)
        XCTAssertEqual(sampler.sample([.nan, 1, 5, 5]), 2, "first maximum, NaN skipped")
        XCTAssertEqual(TokenSampler.argmax([-.infinity, -.infinity]), 0)
        var zeroTemperature = TokenSampler(settings: SamplingSettings(temperature: 0, topP: 0.5, seed: 1))
        XCTAssertEqual(zeroTemperature.sample([1, 9, 3]), 1)
    }

    func testSameSeedSameTokens() {
        let logits: [Float] = (0..<50).map { Float($0 % 7) * 0.3 }
        let settings = SamplingSettings(temperature: 1.2, topP: 0.95, seed: 2024)
        var a = TokenSampler(settings: settings)
        var b = TokenSampler(settings: settings)
        let first = (0..<200).map { _ in a.sample(logits) }
        XCTAssertEqual(first, (0..<200).map { _ in b.sample(logits) })
        XCTAssertGreaterThan(Set(first).count, 5, "temperature 1.2 samples, it does not pick one token")
    }

    func testFrequenciesFollowSoftmaxOverTemperature() {
        let logits: [Float] = [2, 1, 0, -1]
        let temperature = 0.8
        var sampler = TokenSampler(settings: SamplingSettings(temperature: temperature, topP: 1, seed: 7))
        let draws = 20_000
        var counts = [Int](repeating: 0, count: logits.count)
        for _ in 0..<draws { counts[sampler.sample(logits)] += 1 }
        let weights = logits.map { exp(Double($0) / temperature) }
        let total = weights.reduce(0, +)
        for (i, weight) in weights.enumerated() {
            // 20000 draws: one standard deviation is at most 0.0035; 0.02 is about six.
            XCTAssertEqual(Double(counts[i]) / Double(draws), weight / total, accuracy: 0.02, "token \(i)")
        }
    }

    func testTopPKeepsTheSmallestHeadReachingP() {
        // softmax([3, 3, 0, -10]) = [0.4878, 0.4878, 0.0243, ~0]
        let logits: [Float] = [3, 3, 0, -10]
        let weights = logits.map { exp(Double($0)) }
        XCTAssertEqual(TokenSampler.nucleus(weights: weights, total: weights.reduce(0, +), topP: 0.9), [0, 1])
        var nucleus = TokenSampler(settings: SamplingSettings(temperature: 1, topP: 0.9, seed: 3))
        let drawn = Set((0..<2_000).map { _ in nucleus.sample(logits) })
        XCTAssertEqual(drawn, [0, 1], "the tail (2, 3) is never drawn")
        var narrow = TokenSampler(settings: SamplingSettings(temperature: 1, topP: 0.4, seed: 3))
        XCTAssertEqual(Set((0..<500).map { _ in narrow.sample(logits) }), [0], "ties keep the lower index")
    }

    func testNucleusOverALargeVocabularyMatchesAFullSort() {
        var generator = SeededGenerator(seed: 11)
        let weights = (0..<50_000).map { _ in exp(generator.nextUnit() * 12) }
        let total = weights.reduce(0, +)
        for topP in [0.1, 0.5, 0.9, 0.999] {
            let fullSort = weights.indices.sorted { weights[$0] != weights[$1] ? weights[$0] > weights[$1] : $0 < $1 }
            var expected: [Int] = []
            var mass = 0.0
            for i in fullSort {
                expected.append(i)
                mass += weights[i]
                if mass >= topP * total { break }
            }
            XCTAssertEqual(TokenSampler.nucleus(weights: weights, total: total, topP: topP), expected, "topP \(topP)")
        }
    }
}
