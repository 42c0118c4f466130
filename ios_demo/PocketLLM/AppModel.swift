import Foundation
import Observation
import PocketLLMCore
import PocketLLMEngines

/// One message of the chat screen; an assistant reply carries its statistics when done.
struct ChatTurn: Identifiable, Sendable {
    let id = UUID()
    var message: ChatMessage
    var stats: GenerationStats?
    var streaming = false
}

/// Where the open bundle is on its way to chatting.
enum LoadPhase: Equatable {
    case idle
    case verifying(VerificationProgress)
    case loading(String)
    case ready
    case failed(ErrorScreen)
}

/// The app's state, on the main actor. Blocking work (scanning, copying, hashing, loading, generating) runs in
/// tasks off the main actor and reports back here.
@MainActor
@Observable
final class AppModel {
    // Library
    var bundles: [BundleEntry] = []
    var libraryError: ErrorScreen?
    var busyMessage: String?

    // Open bundle
    var selected: BundleEntry?
    var manifest: Manifest?
    var target: TargetKind = .coreml
    var computeUnits: ComputeUnits = .all
    var phase: LoadPhase = .idle
    private(set) var engine: (any ChatEngine)?

    // Chat
    var turns: [ChatTurn] = []
    var isGenerating = false
    var chatError: ErrorScreen?
    var notice: String?
    var settings = GenerationSettings()

    /// The pocketllm kernels this binary links (Info.plist PocketLLMLinkedKernels, written by the build script).
    let kernels = KernelCheck(
        infoPlistValue: Bundle.main.object(forInfoDictionaryKey: KernelCheck.infoPlistKey) as? String)

    @ObservationIgnored private var loadTask: Task<Void, Never>?
    @ObservationIgnored private var generationTask: Task<Void, Never>?
    @ObservationIgnored private var compiledModels: CompiledModelCache?

    private static let settingsKey = "generationSettings"
    private static let computeUnitsKey = "computeUnits"

    init() {
        let defaults = UserDefaults.standard
        if let data = defaults.data(forKey: Self.settingsKey),
            let saved = try? JSONDecoder().decode(GenerationSettings.self, from: data)
        {
            settings = saved
        }
        if let raw = defaults.string(forKey: Self.computeUnitsKey), let saved = ComputeUnits(rawValue: raw) {
            computeUnits = saved
        }
    }

    /// Persists settings and compute units (the views call it when either changes).
    func save() {
        let defaults = UserDefaults.standard
        if let data = try? JSONEncoder().encode(settings) { defaults.set(data, forKey: Self.settingsKey) }
        defaults.set(computeUnits.rawValue, forKey: Self.computeUnitsKey)
    }

    // MARK: Library

    func refresh() async {
        do {
            bundles = try await Task.detached(priority: .userInitiated) { try BundleLibrary.scan() }.value
            libraryError = nil
        } catch {
            libraryError = ErrorScreen(error)
        }
    }

    func importFolder(_ result: Result<[URL], Error>) async {
        do {
            guard let picked = try result.get().first else { return }
            busyMessage = "Copying \(picked.lastPathComponent)…"
            defer { busyMessage = nil }
            _ = try await Task.detached(priority: .userInitiated) { try BundleLibrary.importFolder(picked) }.value
            libraryError = nil
        } catch {
            libraryError = ErrorScreen(error)
        }
        await refresh()
    }

    func delete(_ entry: BundleEntry) async {
        if selected == entry { close() }
        do {
            try await Task.detached { try BundleLibrary.delete(entry) }.value
        } catch {
            libraryError = ErrorScreen(error)
        }
        await refresh()
    }

    // MARK: Opening, verifying, loading

    func open(_ entry: BundleEntry) {
        close()
        selected = entry
        do {
            let manifest = try Manifest.load(bundle: entry.url)
            self.manifest = manifest
            target = manifest.targets.available.first ?? .coreml
            if manifest.targets.available.isEmpty {
                throw PocketLLMError.targetMissing(target: "coreml or executorch", bundle: entry.name)
            }
            if manifest.chat == nil { notice = "This bundle has no chat template: replies continue plain text." }
        } catch {
            phase = .failed(ErrorScreen(error))
        }
    }

    func close() {
        loadTask?.cancel()
        generationTask?.cancel()
        loadTask = nil
        generationTask = nil
        engine = nil
        manifest = nil
        selected = nil
        turns = []
        phase = .idle
        chatError = nil
        notice = nil
        isGenerating = false
    }

    /// Checks what this build can run, verifies every sha256 (with progress), then loads the engine.
    func verifyAndLoad() {
        guard let entry = selected, let manifest else { return }
        loadTask?.cancel()
        engine = nil
        let target = self.target
        let computeUnits = self.computeUnits
        let kernels = self.kernels
        loadTask = Task {
            do {
                // Refuse early what this build cannot run: no need to hash gigabytes first.
                if target == .executorch, let executorch = manifest.targets.executorch {
                    try kernels.check(executorch)
                }
                phase = .verifying(VerificationProgress(bytesDone: 0, bytesTotal: 1, file: "", filesDone: 0,
                                                        filesTotal: manifest.files.count))
                try await verify(entry.url, manifest)
                phase = .loading(target == .coreml
                    ? "Loading the Core ML model (the first load compiles it)…" : "Loading the ExecuTorch program…")
                let cache = try compiledModelCache()
                let engine = try await EngineLoader.load(bundle: entry.url, manifest: manifest, target: target,
                                                         computeUnits: computeUnits, kernels: kernels, cache: cache)
                try Task.checkCancellation()
                self.engine = engine
                phase = .ready
            } catch is CancellationError {
                phase = .idle
            } catch {
                phase = .failed(ErrorScreen(error))
            }
        }
    }

    func cancelLoad() {
        loadTask?.cancel()
    }

    private func compiledModelCache() throws -> CompiledModelCache {
        if let compiledModels { return compiledModels }
        let cache = try CompiledModelCache.applicationSupport()
        compiledModels = cache
        return cache
    }

    /// Hashes off the main actor; progress comes back through a stream that keeps only the newest value.
    private func verify(_ bundle: URL, _ manifest: Manifest) async throws {
        let (updates, continuation) = AsyncStream<VerificationProgress>.makeStream(bufferingPolicy: .bufferingNewest(1))
        let hashing = Task.detached(priority: .userInitiated) {
            defer { continuation.finish() }
            try BundleVerifier(bundle: bundle, manifest: manifest).verify { _ = continuation.yield($0) }
        }
        try await withTaskCancellationHandler {
            for await update in updates { phase = .verifying(update) }
            try await hashing.value
        } onCancel: {
            hashing.cancel()
        }
    }

    // MARK: Chat

    var templateAvailable: Bool { manifest?.chat != nil }

    func send(_ text: String) {
        let text = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !text.isEmpty, !isGenerating, let engine, let manifest else { return }
        chatError = nil
        turns.append(ChatTurn(message: ChatMessage(role: .user, content: text)))
        let useTemplate = settings.useChatTemplate && manifest.chat != nil
        let prompt: ChatPrompt
        do {
            prompt = try ChatFormatter(template: manifest.chat)
                .prompt(for: turns.map(\.message), systemPrompt: settings.systemPrompt, useTemplate: useTemplate)
        } catch {
            chatError = ErrorScreen(error)
            return
        }
        if prompt.droppedSystemPrompt { notice = "This model's chat template has no system role: the system prompt is not used." }
        turns.append(ChatTurn(message: ChatMessage(role: .assistant, content: ""), streaming: true))
        let replyID = turns[turns.count - 1].id
        let settings = self.settings
        let stopIDs = manifest.stopTokenIDs(useTemplate: useTemplate)
        isGenerating = true

        generationTask = Task {
            let (texts, continuation) = AsyncStream<String>.makeStream(bufferingPolicy: .bufferingNewest(1))
            let display = Task { @MainActor in
                for await text in texts { self.updateReply(replyID, text: text) }
            }
            var stats: GenerationStats?
            do {
                stats = try await engine.generate(prompt: prompt.text, settings: settings, stopTokenIDs: stopIDs) {
                    _ = continuation.yield($0)
                }
            } catch {
                chatError = ErrorScreen(error)
            }
            continuation.finish()
            await display.value
            finishReply(replyID, stats: stats)
        }
    }

    func stop() {
        generationTask?.cancel()
    }

    func newChat() {
        generationTask?.cancel()
        turns = []
        chatError = nil
        if let engine { Task { await engine.resetConversation() } }
    }

    private func updateReply(_ id: UUID, text: String) {
        guard let index = turns.firstIndex(where: { $0.id == id }) else { return }
        turns[index].message.content = text
    }

    private func finishReply(_ id: UUID, stats: GenerationStats?) {
        isGenerating = false
        generationTask = nil
        guard let index = turns.firstIndex(where: { $0.id == id }) else { return }
        turns[index].streaming = false
        turns[index].stats = stats
        if stats == nil && turns[index].message.content.isEmpty {
            turns.remove(at: index)  // the engine failed before any text: the error screen says why
        }
    }
}
