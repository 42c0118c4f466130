import Foundation

/// What the user sets in the app's settings screen.
public struct GenerationSettings: Codable, Equatable, Sendable {
    public var sampling: SamplingSettings
    public var maxNewTokens: Int
    public var systemPrompt: String
    /// Format the conversation with the bundle's chat template (manifest `chat`); off = plain text continuation.
    public var useChatTemplate: Bool

    public init(sampling: SamplingSettings = SamplingSettings(), maxNewTokens: Int = 256, systemPrompt: String = "",
                useChatTemplate: Bool = true)
    {
        self.sampling = sampling
        self.maxNewTokens = maxNewTokens
        self.systemPrompt = systemPrompt
        self.useChatTemplate = useChatTemplate
    }
}

/// Which processors Core ML may use (MLComputeUnits without the Apple import).
public enum ComputeUnits: String, Codable, CaseIterable, Sendable, Identifiable {
    case cpuOnly
    case cpuAndGPU
    case all

    public var id: String { rawValue }
    public var displayName: String {
        switch self {
        case .cpuOnly: return "CPU"
        case .cpuAndGPU: return "CPU + GPU"
        case .all: return "All (CPU, GPU, Neural Engine)"
        }
    }
}

public enum StopReason: String, Codable, Sendable {
    /// The model produced an end-of-turn / end-of-text token.
    case stopToken
    /// maxNewTokens reached.
    case maxTokens
    /// The KV cache is full (manifest model.max_context).
    case contextFull
    /// The user pressed stop.
    case cancelled
}

/// Speed of one reply. Prefill: the prompt tokens the model actually ran (a cached prefix from the previous turn is
/// not run again, so it is counted in `reusedTokens` instead). Decode: generated tokens over the time from the end of
/// prefill to the last token.
public struct GenerationStats: Equatable, Sendable {
    public var promptTokens: Int
    public var reusedTokens: Int
    public var prefillSeconds: Double
    public var generatedTokens: Int
    public var decodeSeconds: Double
    public var stopReason: StopReason

    public init(promptTokens: Int = 0, reusedTokens: Int = 0, prefillSeconds: Double = 0, generatedTokens: Int = 0,
                decodeSeconds: Double = 0, stopReason: StopReason = .stopToken)
    {
        self.promptTokens = promptTokens
        self.reusedTokens = reusedTokens
        self.prefillSeconds = prefillSeconds
        self.generatedTokens = generatedTokens
        self.decodeSeconds = decodeSeconds
        self.stopReason = stopReason
    }

    public var prefilledTokens: Int { promptTokens - reusedTokens }

    public var prefillTokensPerSecond: Double? {
        prefillSeconds > 0 && prefilledTokens > 0 ? Double(prefilledTokens) / prefillSeconds : nil
    }

    public var decodeTokensPerSecond: Double? {
        decodeSeconds > 0 && generatedTokens > 0 ? Double(generatedTokens) / decodeSeconds : nil
    }

    /// "prefill 312.4 tok/s (57 tokens) · decode 24.1 tok/s (128 tokens)"
    public var summary: String {
        func rate(_ value: Double?) -> String {
            guard let value else { return "–" }
            return String(format: "%.1f", value)
        }
        var parts = ["prefill \(rate(prefillTokensPerSecond)) tok/s (\(prefilledTokens) tokens)"]
        if reusedTokens > 0 { parts[0] += ", \(reusedTokens) cached" }
        parts.append("decode \(rate(decodeTokensPerSecond)) tok/s (\(generatedTokens) tokens)")
        return parts.joined(separator: " · ")
    }
}

/// Seconds of a Duration (ContinuousClock) as a Double.
public func seconds(_ duration: Duration) -> Double {
    let parts = duration.components
    return Double(parts.seconds) + Double(parts.attoseconds) * 1e-18
}

/// Something that turns a prompt into a streamed reply: the Core ML generator (LogitsEngine) and the ExecuTorch
/// runner both are. `onText` receives the whole reply so far (not a delta), so a detokenizer may revise its tail.
/// Stopping = cancelling the Task that awaits `generate`; it then returns with stopReason .cancelled.
public protocol ChatEngine: AnyObject, Sendable {
    var info: EngineInfo { get }
    func generate(prompt: String, settings: GenerationSettings, stopTokenIDs: Set<Int>,
                  onText: @escaping @Sendable (String) -> Void) async throws -> GenerationStats
    /// Forget the conversation (the next prompt is prefilled from scratch).
    func resetConversation() async
}

public struct EngineInfo: Equatable, Sendable {
    public let target: TargetKind
    public let detail: String
    /// Settings this engine ignores, shown next to them ("top-p", "seed").
    public let unsupportedSettings: [String]

    public init(target: TargetKind, detail: String, unsupportedSettings: [String] = []) {
        self.target = target
        self.detail = detail
        self.unsupportedSettings = unsupportedSettings
    }
}
