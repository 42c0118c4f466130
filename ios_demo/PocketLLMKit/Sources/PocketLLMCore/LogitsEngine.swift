import Foundation

/// Fixed properties of a model that runs token chunks against a cache it keeps between calls.
public struct ModelLimits: Equatable, Sendable {
    /// Cache length (manifest model.max_context): positions 0..<maxContext.
    public var maxContext: Int
    /// Tokens per prefill call.
    public var prefillChunk: Int
    public var vocabSize: Int
    /// A prompt tail shorter than prefillChunk may be padded to a full chunk (the padding's cache rows lie past the
    /// current position, where attention masks them and later tokens overwrite them).
    public var padsPrefill: Bool
    /// The cache can be rewound to an earlier position (false for recurrent state, which only moves forward).
    public var rewindsCache: Bool

    public init(maxContext: Int, prefillChunk: Int, vocabSize: Int, padsPrefill: Bool, rewindsCache: Bool) {
        self.maxContext = maxContext
        self.prefillChunk = prefillChunk
        self.vocabSize = vocabSize
        self.padsPrefill = padsPrefill
        self.rewindsCache = rewindsCache
    }
}

/// A model whose cache lives between calls: what the Core ML engine implements and the tests fake.
public protocol LogitsModel: AnyObject, Sendable {
    var limits: ModelLimits { get }
    /// Runs `tokens` (1...prefillChunk of them; fewer than prefillChunk only when limits.padsPrefill) at positions
    /// start..<start+tokens.count and returns the logits after the last one.
    func prefill(_ tokens: [Int], at start: Int) async throws -> [Float]
    /// Runs one token at `position` and returns the logits after it.
    func decode(_ token: Int, at position: Int) async throws -> [Float]
    /// Empties the cache (a new, zeroed state).
    func resetCache() async throws
}

/// One model call of a prefill.
public enum PrefillStep: Equatable, Sendable {
    case chunk(Range<Int>)  // indices into the prompt tokens; count <= prefillChunk
    case single(Int)  // one token through the decode function
}

public enum PrefillPlanner {
    /// Calls that run prompt tokens [start, count): full chunks through prefill; a shorter tail through one padded
    /// prefill when the model allows padding and the padded chunk fits in the cache, otherwise token by token.
    public static func plan(count: Int, start: Int, limits: ModelLimits) -> [PrefillStep] {
        var steps: [PrefillStep] = []
        var i = start
        let chunk = max(1, limits.prefillChunk)
        while count - i >= chunk {
            steps.append(.chunk(i..<i + chunk))
            i += chunk
        }
        if i < count {
            if limits.padsPrefill && i + chunk <= limits.maxContext {
                steps.append(.chunk(i..<count))
            } else {
                steps.append(contentsOf: (i..<count).map { PrefillStep.single($0) })
            }
        }
        return steps
    }

    /// How many leading prompt tokens the cache already holds and can keep: the common prefix with what it holds,
    /// at most prompt.count - 1 (the last prompt token is always run, its logits start the reply). A cache that
    /// cannot be rewound is kept only when it holds nothing beyond the common prefix.
    public static func reusablePrefix(cached: [Int], prompt: [Int], rewinds: Bool) -> Int {
        var common = 0
        while common < cached.count && common < prompt.count && cached[common] == prompt[common] { common += 1 }
        common = min(common, max(0, prompt.count - 1))
        if !rewinds && common < cached.count { return 0 }
        return common
    }
}

/// The generation loop over a LogitsModel: tokenize the prompt, keep the cached prefix of the previous turn, prefill
/// the rest in chunks, then sample token by token until a stop token, maxNewTokens, a full cache or cancellation.
/// An actor: one generation at a time, the cache bookkeeping (`cached`) always matches the model's cache.
public actor LogitsEngine: ChatEngine {
    public nonisolated let info: EngineInfo
    private let model: any LogitsModel
    private let tokenizer: any TextTokenizer
    private let tokenizerInfo: Manifest.TokenizerInfo
    /// Token ids whose keys/values the model's cache holds, at positions 0..<cached.count.
    private var cached: [Int] = []
    private var cacheDirty = false
    private var running = false

    public init(model: any LogitsModel, tokenizer: any TextTokenizer, tokenizerInfo: Manifest.TokenizerInfo,
                info: EngineInfo)
    {
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizerInfo = tokenizerInfo
        self.info = info
    }

    public func resetConversation() async {
        cached = []
        cacheDirty = true
    }

    /// Tokens the cache holds (for tests and the UI).
    public var cachedTokenCount: Int { cached.count }

    public func generate(prompt: String, settings: GenerationSettings, stopTokenIDs: Set<Int>,
                         onText: @escaping @Sendable (String) -> Void) async throws -> GenerationStats
    {
        guard !running else { throw PocketLLMError.busy }
        running = true
        defer { running = false }

        let limits = model.limits
        let tokenizer = self.tokenizer
        let promptTokens = tokenizer.promptTokens(prompt, tokenizer: tokenizerInfo)
        guard !promptTokens.isEmpty else {
            throw PocketLLMError.unsupported(what: "prompt", reason: "is empty after tokenization")
        }
        guard promptTokens.count < limits.maxContext else {
            throw PocketLLMError.contextFull(promptTokens: promptTokens.count, maxContext: limits.maxContext)
        }
        var stats = GenerationStats(promptTokens: promptTokens.count)
        let clock = ContinuousClock()

        // Prefill: keep what the cache already holds of this prompt, run the rest.
        let prefillStart = clock.now
        var reuse = PrefillPlanner.reusablePrefix(cached: cached, prompt: promptTokens, rewinds: limits.rewindsCache)
        if cacheDirty || (reuse == 0 && !cached.isEmpty) {
            try await model.resetCache()
            cacheDirty = false
            reuse = 0
        }
        cached = Array(promptTokens[0..<reuse])
        stats.reusedTokens = reuse
        var logits: [Float] = []
        do {
            for step in PrefillPlanner.plan(count: promptTokens.count, start: reuse, limits: limits) {
                if Task.isCancelled { break }
                switch step {
                case .chunk(let range):
                    let chunk = Array(promptTokens[range])
                    logits = try await model.prefill(chunk, at: range.lowerBound)
                    cached += chunk
                case .single(let index):
                    logits = try await model.decode(promptTokens[index], at: index)
                    cached.append(promptTokens[index])
                }
            }
        } catch {
            cacheDirty = true  // a failed call may have written part of a chunk
            throw error
        }
        stats.prefillSeconds = seconds(clock.now - prefillStart)
        if cached.count < promptTokens.count {  // cancelled during prefill
            stats.stopReason = .cancelled
            return stats
        }

        // Decode.
        let decodeStart = clock.now
        var sampler = TokenSampler(settings: settings.sampling)
        var detokenizer = StreamingDetokenizer()
        let maxNew = max(0, settings.maxNewTokens)
        stats.stopReason = .maxTokens
        while stats.generatedTokens < maxNew {
            if Task.isCancelled {
                stats.stopReason = .cancelled
                break
            }
            let token = sampler.sample(logits)
            if stopTokenIDs.contains(token) {
                stats.stopReason = .stopToken
                break
            }
            stats.generatedTokens += 1
            if let text = detokenizer.append(token, decode: { tokenizer.decode($0) }) { onText(text) }
            if stats.generatedTokens == maxNew { break }  // no need to run the last token
            if cached.count >= limits.maxContext {
                stats.stopReason = .contextFull
                break
            }
            do {
                logits = try await model.decode(token, at: cached.count)
            } catch {
                cacheDirty = true
                throw error
            }
            cached.append(token)
        }
        stats.decodeSeconds = seconds(clock.now - decodeStart)
        return stats
    }
}
