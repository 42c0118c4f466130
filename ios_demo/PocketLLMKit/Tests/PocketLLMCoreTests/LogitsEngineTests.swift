import Foundation
import XCTest

@testable import PocketLLMCore

/// One character = one token (its ASCII code).
struct CharacterTokenizer: TextTokenizer {
    func encode(_ text: String) -> [Int] { text.unicodeScalars.map { Int($0.value) } }
    func decode(_ tokens: [Int]) -> String {
        String(String.UnicodeScalarView(tokens.compactMap { Unicode.Scalar(UInt32($0)) }))
    }
}

/// A model that always predicts "the next letter": logits one-hot at last token + 1. Records every call.
actor AlphabetModel: LogitsModel {
    enum Call: Equatable {
        case prefill(String, at: Int)
        case decode(String, at: Int)
        case reset
    }

    nonisolated let limits: ModelLimits
    private(set) var calls: [Call] = []
    /// Cancels the running task inside the n-th decode call (1-based).
    var cancelOnDecode: Int?
    /// Throws from the next prefill call.
    var failNextPrefill = false
    private var decodes = 0

    init(limits: ModelLimits) {
        self.limits = limits
    }

    func setCancelOnDecode(_ n: Int?) { cancelOnDecode = n }
    func setFailNextPrefill() { failNextPrefill = true }

    private func logits(after token: Int) -> [Float] {
        var row = [Float](repeating: 0, count: limits.vocabSize)
        row[(token + 1) % limits.vocabSize] = 10
        return row
    }

    private static func text(_ tokens: [Int]) -> String { CharacterTokenizer().decode(tokens) }

    func prefill(_ tokens: [Int], at start: Int) async throws -> [Float] {
        if failNextPrefill {
            failNextPrefill = false
            throw PocketLLMError.predictionFailed(function: "prefill", reason: "test")
        }
        calls.append(.prefill(Self.text(tokens), at: start))
        return logits(after: tokens.last ?? 0)
    }

    func decode(_ token: Int, at position: Int) async throws -> [Float] {
        calls.append(.decode(Self.text([token]), at: position))
        decodes += 1
        if decodes == cancelOnDecode {
            withUnsafeCurrentTask { task in
                if let task { task.cancel() }
            }
        }
        return logits(after: token)
    }

    func resetCache() async throws {
        calls.append(.reset)
    }

    func takeCalls() -> [Call] {
        defer { calls = [] }
        return calls
    }
}

/// Collects the streamed texts.
final class TextLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [String] = []
    func append(_ text: String) {
        lock.lock()
        items.append(text)
        lock.unlock()
    }
    var last: String? {
        lock.lock()
        defer { lock.unlock() }
        return items.last
    }
}

final class LogitsEngineTests: XCTestCase {
    let noBOS = Manifest.TokenizerInfo(files: ["tokenizer.json"], kind: "huggingface", file: "tokenizer.json",
                                       bosID: nil, eosIDs: [], numBOS: 0, chatTemplate: nil)

    func limits(maxContext: Int = 64, chunk: Int = 4, pads: Bool = true, rewinds: Bool = true) -> ModelLimits {
        ModelLimits(maxContext: maxContext, prefillChunk: chunk, vocabSize: 128, padsPrefill: pads, rewindsCache: rewinds)
    }

    func engine(_ model: AlphabetModel, tokenizerInfo: Manifest.TokenizerInfo? = nil) -> LogitsEngine {
        LogitsEngine(model: model, tokenizer: CharacterTokenizer(), tokenizerInfo: tokenizerInfo ?? noBOS,
                     info: EngineInfo(target: .coreml, detail: "test"))
    }

    func greedy(_ maxNewTokens: Int) -> GenerationSettings {
        GenerationSettings(sampling: .greedy, maxNewTokens: maxNewTokens)
    }

    func testPrefillInChunksThenDecodeUntilMaxTokens() async throws {
        let model = AlphabetModel(limits: limits())
        let log = TextLog()
        let stats = try await engine(model).generate(prompt: "abcdefghij", settings: greedy(3), stopTokenIDs: []) {
            log.append($0)
        }
        let calls = await model.takeCalls()
        XCTAssertEqual(calls, [
            .prefill("abcd", at: 0), .prefill("efgh", at: 4), .prefill("ij", at: 8),  // the tail padded by the model
            .decode("k", at: 10), .decode("l", at: 11),  // "m" is the last token: not run
        ])
        XCTAssertEqual(log.last, "klm")
        XCTAssertEqual(stats.promptTokens, 10)
        XCTAssertEqual(stats.reusedTokens, 0)
        XCTAssertEqual(stats.generatedTokens, 3)
        XCTAssertEqual(stats.stopReason, .maxTokens)
    }

    func testTailRunsTokenByTokenWhenPaddingIsNotAllowed() async throws {
        let model = AlphabetModel(limits: limits(pads: false))
        _ = try await engine(model).generate(prompt: "abcdef", settings: greedy(1), stopTokenIDs: []) { _ in }
        let calls = await model.takeCalls()
        XCTAssertEqual(calls, [.prefill("abcd", at: 0), .decode("e", at: 4), .decode("f", at: 5)])
    }

    func testPrefillPlanner() {
        XCTAssertEqual(PrefillPlanner.plan(count: 9, start: 0, limits: limits()),
                       [.chunk(0..<4), .chunk(4..<8), .chunk(8..<9)])
        XCTAssertEqual(PrefillPlanner.plan(count: 9, start: 7, limits: limits()), [.chunk(7..<9)])
        XCTAssertEqual(PrefillPlanner.plan(count: 6, start: 0, limits: limits(maxContext: 7)),
                       [.chunk(0..<4), .single(4), .single(5)], "a padded chunk past the cache is not run")
        XCTAssertEqual(PrefillPlanner.plan(count: 8, start: 0, limits: limits()), [.chunk(0..<4), .chunk(4..<8)])
    }

    func testReusablePrefix() {
        XCTAssertEqual(PrefillPlanner.reusablePrefix(cached: [1, 2, 3], prompt: [1, 2, 3, 4], rewinds: true), 3)
        XCTAssertEqual(PrefillPlanner.reusablePrefix(cached: [1, 2, 3], prompt: [1, 2, 3], rewinds: true), 2,
                       "the last prompt token always runs")
        XCTAssertEqual(PrefillPlanner.reusablePrefix(cached: [1, 9, 3], prompt: [1, 2, 3, 4], rewinds: true), 1)
        XCTAssertEqual(PrefillPlanner.reusablePrefix(cached: [1, 9, 3], prompt: [1, 2, 3, 4], rewinds: false), 0,
                       "a recurrent state cannot drop the tokens after the divergence")
        XCTAssertEqual(PrefillPlanner.reusablePrefix(cached: [1, 2], prompt: [1, 2, 3, 4], rewinds: false), 2)
    }

    func testStopTokenEndsTheReplyAndIsNotShown() async throws {
        let model = AlphabetModel(limits: limits())
        let log = TextLog()
        let stats = try await engine(model).generate(prompt: "abc", settings: greedy(10),
                                                     stopTokenIDs: [Int(UnicodeScalar("f").value)]) { log.append($0) }
        XCTAssertEqual(log.last, "de")
        XCTAssertEqual(stats.generatedTokens, 2)
        XCTAssertEqual(stats.stopReason, .stopToken)
    }

    func testSecondTurnPrefillsOnlyWhatTheCacheLacks() async throws {
        let model = AlphabetModel(limits: limits())
        let chat = engine(model)
        _ = try await chat.generate(prompt: "abcdefghij", settings: greedy(3), stopTokenIDs: []) { _ in }
        _ = await model.takeCalls()
        // The cache holds abcdefghij + k + l (m was never run). The next prompt repeats the conversation.
        let stats = try await chat.generate(prompt: "abcdefghijklmXY", settings: greedy(1), stopTokenIDs: []) { _ in }
        let calls = await model.takeCalls()
        XCTAssertEqual(calls, [.prefill("mXY", at: 12)])
        XCTAssertEqual(stats.reusedTokens, 12)
        XCTAssertEqual(stats.prefilledTokens, 3)
    }

    func testEditedHistoryRewindsOrResets() async throws {
        let rewinding = AlphabetModel(limits: limits())
        let a = engine(rewinding)
        _ = try await a.generate(prompt: "abcdefgh", settings: greedy(1), stopTokenIDs: []) { _ in }
        _ = await rewinding.takeCalls()
        _ = try await a.generate(prompt: "abcdXYZW", settings: greedy(1), stopTokenIDs: []) { _ in }
        let rewound = await rewinding.takeCalls()
        XCTAssertEqual(rewound, [.prefill("XYZW", at: 4)], "positions 4... are simply overwritten")

        let recurrent = AlphabetModel(limits: limits(pads: false, rewinds: false))
        let b = engine(recurrent)
        _ = try await b.generate(prompt: "abcdefgh", settings: greedy(1), stopTokenIDs: []) { _ in }
        _ = await recurrent.takeCalls()
        _ = try await b.generate(prompt: "abcdXYZW", settings: greedy(1), stopTokenIDs: []) { _ in }
        let reset = await recurrent.takeCalls()
        XCTAssertEqual(reset, [.reset, .prefill("abcd", at: 0), .prefill("XYZW", at: 4)])
    }

    func testContextFullStopsAndAnOversizedPromptIsRefused() async throws {
        let model = AlphabetModel(limits: limits(maxContext: 12))
        let log = TextLog()
        let stats = try await engine(model).generate(prompt: "abcdefghij", settings: greedy(50), stopTokenIDs: []) {
            log.append($0)
        }
        XCTAssertEqual(stats.stopReason, .contextFull)
        XCTAssertEqual(log.last, "klm")
        do {
            _ = try await engine(model).generate(prompt: "abcdefghijkl", settings: greedy(5), stopTokenIDs: []) { _ in }
            XCTFail("a 12-token prompt fits no reply in a 12-token cache")
        } catch let error as PocketLLMError {
            XCTAssertEqual(error, .contextFull(promptTokens: 12, maxContext: 12))
        }
    }

    func testCancellationEndsWithStopReasonCancelled() async throws {
        let model = AlphabetModel(limits: limits())
        await model.setCancelOnDecode(2)
        let stats = try await engine(model).generate(prompt: "abc", settings: greedy(20), stopTokenIDs: []) { _ in }
        XCTAssertEqual(stats.stopReason, .cancelled)
        XCTAssertEqual(stats.generatedTokens, 2)
    }

    func testAFailedCallResetsTheCacheBeforeTheNextReply() async throws {
        let model = AlphabetModel(limits: limits())
        let chat = engine(model)
        _ = try await chat.generate(prompt: "abcd", settings: greedy(1), stopTokenIDs: []) { _ in }
        await model.setFailNextPrefill()
        do {
            _ = try await chat.generate(prompt: "abcdefgh", settings: greedy(1), stopTokenIDs: []) { _ in }
            XCTFail("the prefill error is passed on")
        } catch is PocketLLMError {}
        _ = await model.takeCalls()
        _ = try await chat.generate(prompt: "abcdefgh", settings: greedy(1), stopTokenIDs: []) { _ in }
        let calls = await model.takeCalls()
        XCTAssertEqual(calls, [.reset, .prefill("abcd", at: 0), .prefill("efgh", at: 4)])
    }

    func testBOSFromTheManifestStartsThePrompt() async throws {
        let model = AlphabetModel(limits: limits())
        let withBOS = Manifest.TokenizerInfo(files: ["tokenizer.json"], kind: "huggingface", file: "tokenizer.json",
                                             bosID: Int(UnicodeScalar("^").value), eosIDs: [], numBOS: 1,
                                             chatTemplate: nil)
        let stats = try await engine(model, tokenizerInfo: withBOS)
            .generate(prompt: "abc", settings: greedy(1), stopTokenIDs: []) { _ in }
        let calls = await model.takeCalls()
        XCTAssertEqual(calls, [.prefill("^abc", at: 0)])
        XCTAssertEqual(stats.promptTokens, 4)
    }
}
