import Foundation

/// What the app's error screen shows for an error: a short title, the one-line message, and what to do next.
public struct ErrorScreen: Equatable, Sendable {
    public enum Kind: String, Sendable {
        case noBundle, badBundle, badHash, missingKernels, outOfMemory, loadFailed, runFailed, other
    }

    public let kind: Kind
    public let title: String
    public let message: String
    public let hint: String

    public init(_ error: Error) {
        guard let error = error as? PocketLLMError else {
            kind = .other
            title = "Something went wrong"
            message = error.localizedDescription
            hint = "Try again; if it persists, re-import the bundle."
            return
        }
        message = error.description
        switch error {
        case .bundleNotFound, .manifestMissing:
            kind = .noBundle
            title = "No bundle"
            hint = "Import a bundle folder written by `pocketllm export` (Files, or Finder file sharing)."
        case .manifestUnreadable, .unknownSchemaVersion, .manifestInvalid, .unsafePath, .targetMissing, .unsupported:
            kind = .badBundle
            title = "This bundle cannot be used"
            hint = "Re-export it with the pocketllm version this app matches (manifest schema_version "
                + "\(Manifest.supportedSchemaVersion))."
        case .fileMissing, .sizeMismatch, .hashMismatch, .unlistedFile:
            kind = .badHash
            title = "Bundle verification failed"
            hint = "A file differs from manifest.json: copy the bundle again (the whole folder)."
        case .missingKernels:
            kind = .missingKernels
            title = "Kernels missing from this build"
            hint = "Build the app with the pocketllm kernels (see ios_demo/README.md), or use the Core ML target."
        case .notEnoughMemory, .outOfMemory:
            kind = .outOfMemory
            title = "Out of memory"
            hint = "Close other apps, or export a smaller or quantized bundle."
        case .modelLoadFailed, .tokenizerFailed:
            kind = .loadFailed
            title = "Model failed to load"
            hint = "Try other compute units, or re-export the bundle."
        case .contextFull, .predictionFailed, .busy:
            kind = .runFailed
            title = "Generation stopped"
            hint = "Start a new chat, or lower max new tokens."
        }
    }
}
