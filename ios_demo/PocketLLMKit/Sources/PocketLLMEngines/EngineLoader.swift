import Foundation
import PocketLLMCore

#if canImport(os)
import os
#endif

/// Creates the engine for a verified bundle: refuses what this build or device cannot run (missing kernels, not
/// enough memory) before loading anything.
public enum EngineLoader {
    public static func load(bundle: URL, manifest: Manifest, target: TargetKind, computeUnits: ComputeUnits,
                            kernels: KernelCheck, cache: CompiledModelCache) async throws -> any ChatEngine
    {
        try checkMemory(bundle: bundle, manifest: manifest, target: target)
        switch target {
        case .executorch:
            return try await ExecuTorchEngine.load(bundle: bundle, manifest: manifest, kernels: kernels)
        case .coreml:
            let tokenizer = try await BundleTokenizer.load(bundle: bundle, manifest: manifest)
            let model = try await CoreMLLanguageModel(bundle: bundle, manifest: manifest, computeUnits: computeUnits,
                                                      cache: cache)
            let info = EngineInfo(target: .coreml, detail: "Core ML, \(computeUnits.displayName)")
            return LogitsEngine(model: model, tokenizer: tokenizer, tokenizerInfo: manifest.tokenizer, info: info)
        }
    }

    /// The weights are mapped into memory when the model loads: refuse when they plainly do not fit in what iOS
    /// lets this app use now (os_proc_available_memory), instead of being killed by the system mid-load.
    static func checkMemory(bundle: URL, manifest: Manifest, target: TargetKind) throws {
        #if os(iOS)
        guard let artifact = manifest.artifact(for: target) else { return }
        let keys = artifact.isDirectory ? manifest.files(under: artifact.path) : [artifact.path]
        let bytes = keys.reduce(Int64(0)) { $0 + (manifest.files[$1]?.size ?? 0) }
        let available = Int64(os_proc_available_memory())
        // KV cache and activations come on top of the weights; 10 % headroom keeps the estimate honest, not exact.
        let needed = bytes + bytes / 10
        if available > 0 && needed > available {
            throw PocketLLMError.notEnoughMemory(neededMiB: Int(needed >> 20), availableMiB: Int(available >> 20))
        }
        #endif
    }
}
