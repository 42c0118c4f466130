import Foundation
import XCTest

@testable import PocketLLMCore

final class HalfFloatTests: XCTestCase {
    func testKnownBitPatterns() {
        XCTAssertEqual(HalfFloat.toFloat(0x3c00), 1)
        XCTAssertEqual(HalfFloat.toFloat(0xc000), -2)
        XCTAssertEqual(HalfFloat.toFloat(0x7bff), 65504)
        XCTAssertEqual(HalfFloat.toFloat(0x0001), Float(bitPattern: 0x3380_0000))  // 2^-24, smallest subnormal
        XCTAssertEqual(HalfFloat.toFloat(0x7c00), .infinity)
        XCTAssertTrue(HalfFloat.toFloat(0x7e00).isNaN)
        XCTAssertEqual(HalfFloat.toFloat(0x8000).sign, .minus)
    }

    func testEveryHalfRoundTrips() {
        var mismatches: [UInt16] = []
        for bits in UInt16.min...UInt16.max {
            let value = HalfFloat.toFloat(bits)
            if !value.isNaN && HalfFloat.fromFloat(value) != bits { mismatches.append(bits) }
        }
        XCTAssertEqual(mismatches, [])
    }

    func testRoundsToNearestEven() {
        XCTAssertEqual(HalfFloat.fromFloat(1 + 1.0 / 2048), 0x3c00, "halfway between 1 and the next half: even")
        XCTAssertEqual(HalfFloat.fromFloat(1 + 3.0 / 2048), 0x3c02, "halfway, odd below: rounds up")
        XCTAssertEqual(HalfFloat.fromFloat(65520), 0x7c00, "overflow to infinity")
        XCTAssertEqual(HalfFloat.fromFloat(1e-9), 0)
    }
}

final class DetokenizerTests: XCTestCase {
    func testHoldsBackAnIncompleteCharacterAndReportsTheWholeText() {
        // A toy byte tokenizer: each id is one UTF-8 byte; an incomplete sequence decodes to U+FFFD.
        let decode: ([Int]) -> String = { ids in String(decoding: ids.map { UInt8($0) }, as: UTF8.self) }
        var detokenizer = StreamingDetokenizer()
        XCTAssertEqual(detokenizer.append(0x48, decode: decode), "H")
        XCTAssertNil(detokenizer.append(0xC3, decode: decode), "first byte of é")
        XCTAssertEqual(detokenizer.append(0xA9, decode: decode), "Hé")
        XCTAssertEqual(detokenizer.text, "Hé")
        XCTAssertEqual(detokenizer.tokens, [0x48, 0xC3, 0xA9])
    }
}

final class KernelCheckTests: XCTestCase {
    func testInfoPlistValueParsing() {
        XCTAssertEqual(KernelCheck(infoPlistValue: "pocketllm::any4_linear.out  pocketllm::infllm_attention.out\n").linked,
                       ["pocketllm::any4_linear.out", "pocketllm::infllm_attention.out"])
        XCTAssertEqual(KernelCheck(infoPlistValue: nil).linked, [])
        XCTAssertEqual(KernelCheck(infoPlistValue: "$(POCKETLLM_LINKED_KERNELS)").linked, [],
                       "an unexpanded build setting means none")
    }

    /// The exporter's requires_kernels against a stock build and a build with every pocketllm kernel.
    func testExporterBundlesAgainstStockAndKernelBuilds() throws {
        let fixtures = try Fixtures.load()
        for fixture in try fixtures.bundles(target: "executorch") {
            let target = try XCTUnwrap(try Manifest.load(bundle: fixtures.url(fixture.path)).targets.executorch)
            let stock = KernelCheck(linked: [])
            XCTAssertEqual(stock.missing(for: target), fixture.requiresKernels.sorted())
            if !fixture.requiresKernels.isEmpty {
                assertThrows(.missingKernels(ops: fixture.requiresKernels.sorted(), script: KernelCheck.buildScript)) {
                    try stock.check(target)
                }
                let message = PocketLLMError.missingKernels(ops: fixture.requiresKernels.sorted(),
                                                            script: KernelCheck.buildScript).description
                for op in fixture.requiresKernels { XCTAssertTrue(message.contains(op)) }
                XCTAssertTrue(message.contains("ios_demo/scripts/build_executorch_frameworks.sh"))
            }
            let built = KernelCheck(linked: Set(fixture.requiresKernels))
            XCTAssertNoThrow(try built.check(target))
        }
    }
}

final class ErrorScreenTests: XCTestCase {
    func testEachErrorGetsAScreen() {
        XCTAssertEqual(ErrorScreen(PocketLLMError.manifestMissing(path: "x/manifest.json")).kind, .noBundle)
        XCTAssertEqual(ErrorScreen(PocketLLMError.hashMismatch(path: "model.pte", actual: "a", expected: "b")).kind,
                       .badHash)
        XCTAssertEqual(ErrorScreen(PocketLLMError.notEnoughMemory(neededMiB: 900, availableMiB: 400)).kind,
                       .outOfMemory)
        XCTAssertEqual(ErrorScreen(PocketLLMError.modelLoadFailed(target: "Core ML", reason: "x")).kind, .loadFailed)
        XCTAssertEqual(ErrorScreen(PocketLLMError.missingKernels(ops: ["pocketllm::any4_linear.out"], script: "s")).kind,
                       .missingKernels)
        let screen = ErrorScreen(PocketLLMError.sizeMismatch(path: "model.pte", actual: 1, expected: 2))
        XCTAssertTrue(screen.message.hasPrefix("model.pte: size 1 does not match manifest.json (2)"))
    }
}
