import ExecuTorchLLM
import Foundation
import PocketLLMCore

/// A bundle's model.pte through ExecuTorch's LLM runner (ExecuTorchLLM's TextRunner, the runner etLLM uses): it
/// tokenizes with the bundle's tokenizer file, prefills, samples (temperature only) and stops at the EOS ids the
/// program's metadata lists. pocketllm's own kernels (any4 linear, InfLLM v2, lightning attention) are present only
/// when the app was linked with them (KernelCheck refuses a bundle before this is created otherwise).
///
/// TextRunner calls block and are not thread-safe, so every call runs on one serial queue; a stop request (the Task
/// awaiting `generate` is cancelled) is passed to the runner from its own token callback, as etLLM does.
public final class ExecuTorchEngine: ChatEngine, @unchecked Sendable {
    public let info: EngineInfo
    private let runner: TextRunner  // only touched on `queue`
    private let queue = DispatchQueue(label: "pocketllm.executorch.runner")
    private let manifest: Manifest
    private let tokenizer: BundleTokenizer?
    private let stopFlag = StopFlag()

    /// Loads the program and tokenizer (blocking work, on the runner queue).
    public static func load(bundle: URL, manifest: Manifest, kernels: KernelCheck) async throws -> ExecuTorchEngine {
        guard let target = manifest.targets.executorch else {
            throw PocketLLMError.targetMissing(target: TargetKind.executorch.rawValue, bundle: manifest.name)
        }
        try kernels.check(target)
        let modelPath = bundle.appendingPathComponent(target.file).path
        let tokenizerPath = bundle.appendingPathComponent(manifest.tokenizer.file).path
        // Our own tokenizer only counts prompt tokens and names stop tokens; a bundle whose tokenizer it cannot read
        // (SentencePiece tokenizer.model) still runs, without prefill statistics.
        let tokenizer = try? await BundleTokenizer.load(bundle: bundle, manifest: manifest)
        let engine = ExecuTorchEngine(
            runner: TextRunner(modelPath: modelPath, tokenizerPath: tokenizerPath), manifest: manifest,
            tokenizer: tokenizer)
        try await engine.onQueue { (runner: TextRunner) throws in
            do {
                try runner.load()
            } catch {
                throw PocketLLMError.modelLoadFailed(target: "ExecuTorch", reason: Self.describe(error))
            }
        }
        return engine
    }

    private init(runner: TextRunner, manifest: Manifest, tokenizer: BundleTokenizer?) {
        self.runner = runner
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.info = EngineInfo(
            target: .executorch,
            detail: "ExecuTorch LLM runner, XNNPACK",
            unsupportedSettings: ["top-p", "seed"] + (tokenizer == nil ? ["prefill statistics"] : []))
    }

    /// The runner keeps its KV cache between calls; each reply starts from a reset and the whole conversation (the
    /// prompt), like etLLM. Prefill runs inside TextRunner.generate, so prefill time = time to the first token.
    public func generate(prompt: String, settings: GenerationSettings, stopTokenIDs: Set<Int>,
                         onText: @escaping @Sendable (String) -> Void) async throws -> GenerationStats
    {
        let promptTokens = tokenizer.map { $0.promptTokens(prompt, tokenizer: manifest.tokenizer).count } ?? 0
        if promptTokens >= manifest.model.maxContext {
            throw PocketLLMError.contextFull(promptTokens: promptTokens, maxContext: manifest.model.maxContext)
        }
        // Stop tokens arrive as text pieces; the runner stops by itself at the program's EOS ids, and at these too.
        let stopPieces = Set(stopTokenIDs.compactMap { id in tokenizer?.pieceText(id) }.filter { !$0.isEmpty })
        let maxNewTokens = settings.maxNewTokens
        let temperature = settings.sampling.isGreedy ? 0 : settings.sampling.temperature
        let sequenceLength = manifest.model.maxContext
        let numBOS = manifest.tokenizer.numBOS
        let stopFlag = self.stopFlag
        stopFlag.reset()

        return try await withTaskCancellationHandler {
            try await onQueue { (runner: TextRunner) throws -> GenerationStats in
                runner.reset()
                let clock = ContinuousClock()
                let start = clock.now
                var firstToken: ContinuousClock.Instant?
                var text = ""
                var generated = 0
                var stopReason = StopReason.maxTokens
                let config = Config {
                    $0.isEchoEnabled = false
                    $0.maximumNewTokens = maxNewTokens
                    $0.sequenceLength = sequenceLength
                    $0.temperature = temperature
                    $0.bosCount = numBOS
                    $0.eosCount = 0
                }
                do {
                    try runner.generate(prompt, config) { piece in
                        if stopFlag.isSet {
                            stopReason = .cancelled
                            runner.stop()
                            return
                        }
                        if stopPieces.contains(piece) {
                            stopReason = .stopToken
                            runner.stop()
                            return
                        }
                        if firstToken == nil { firstToken = clock.now }
                        generated += 1
                        text += piece
                        onText(text)
                    }
                } catch {
                    throw Self.runtimeError(error)
                }
                let end = clock.now
                let prefillEnd = firstToken ?? end
                if stopReason == .maxTokens && generated < maxNewTokens && !stopFlag.isSet {
                    stopReason = .stopToken  // the runner stopped at an EOS id (or the context filled)
                }
                if stopFlag.isSet { stopReason = .cancelled }
                return GenerationStats(
                    promptTokens: promptTokens, reusedTokens: 0, prefillSeconds: seconds(prefillEnd - start),
                    generatedTokens: generated, decodeSeconds: seconds(end - prefillEnd), stopReason: stopReason)
            }
        } onCancel: {
            stopFlag.set()
        }
    }

    public func resetConversation() async {
        try? await onQueue { runner in runner.reset() }
    }

    /// Runs `body` on the runner queue and resumes with its result.
    private func onQueue<T: Sendable>(_ body: @escaping @Sendable (TextRunner) throws -> T) async throws -> T {
        let box = UncheckedBox(self.runner)
        return try await withCheckedThrowingContinuation { continuation in
            queue.async {
                continuation.resume(with: Result { try body(box.value) })
            }
        }
    }

    private static func runtimeError(_ error: Error) -> PocketLLMError {
        let code = (error as NSError).code
        if code == 0x21 || code == 0x25 {  // MemoryAllocationFailed, OutOfResources
            return .outOfMemory(context: "running the ExecuTorch program (\(describe(error)))")
        }
        return .predictionFailed(function: "TextRunner.generate", reason: describe(error))
    }

    /// ExecuTorch errors carry runtime/core/error.h codes and no message.
    static func describe(_ error: Error) -> String {
        let ns = error as NSError
        guard ns.domain == ErrorDomain else { return ns.localizedDescription }
        let names: [Int: String] = [
            0x01: "Internal", 0x02: "InvalidState", 0x10: "NotSupported", 0x11: "NotImplemented",
            0x12: "InvalidArgument", 0x13: "InvalidType",
            0x14: "OperatorMissing (the program calls a kernel this build does not link)",
            0x20: "NotFound", 0x21: "MemoryAllocationFailed", 0x22: "AccessFailed",
            0x23: "InvalidProgram (not a .pte this runtime reads)", 0x24: "InvalidExternalData",
            0x25: "OutOfResources", 0x30: "DelegateInvalidCompatibility", 0x31: "DelegateMemoryAllocationFailed",
        ]
        return "ExecuTorch error \(ns.code)" + (names[ns.code].map { " \($0)" } ?? "")
    }
}

/// A flag set from the cancellation handler (any thread) and read in the runner's token callback.
final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false

    var isSet: Bool {
        lock.lock()
        defer { lock.unlock() }
        return value
    }

    func set() {
        lock.lock()
        value = true
        lock.unlock()
    }

    func reset() {
        lock.lock()
        value = false
        lock.unlock()
    }
}

/// Carries the runner into the queue's closure; only the serial queue touches it.
struct UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
