import Foundation

/// The one error type of PocketLLMKit. Every case reads as one line that names the file, key or value and what was
/// expected (the project's PocketllmError convention), so the app can show `description` as is.
public enum PocketLLMError: Error, Equatable, Sendable {
    // Bundle and manifest
    case bundleNotFound(path: String)
    case manifestMissing(path: String)
    case manifestUnreadable(path: String, reason: String)
    case unknownSchemaVersion(path: String, found: String, supported: Int)
    case manifestInvalid(path: String, key: String, reason: String)
    // Files listed in the manifest
    case unsafePath(key: String)
    case fileMissing(path: String)
    case sizeMismatch(path: String, actual: Int64, expected: Int64)
    case hashMismatch(path: String, actual: String, expected: String)
    case unlistedFile(path: String, directory: String)
    // What this build or this device can run
    case targetMissing(target: String, bundle: String)
    case missingKernels(ops: [String], script: String)
    case unsupported(what: String, reason: String)
    case notEnoughMemory(neededMiB: Int, availableMiB: Int)
    case outOfMemory(context: String)
    // Running
    case modelLoadFailed(target: String, reason: String)
    case tokenizerFailed(path: String, reason: String)
    case contextFull(promptTokens: Int, maxContext: Int)
    case predictionFailed(function: String, reason: String)
    case busy
}

extension PocketLLMError: CustomStringConvertible, LocalizedError {
    public var description: String {
        switch self {
        case .bundleNotFound(let path):
            return "\(path): bundle directory not found"
        case .manifestMissing(let path):
            return "\(path): manifest.json not found (is this a bundle written by `pocketllm export`?)"
        case .manifestUnreadable(let path, let reason):
            return "\(path): cannot read manifest.json (\(reason))"
        case .unknownSchemaVersion(let path, let found, let supported):
            return "\(path): unknown schema_version \(found) (this app reads \(supported)); re-export the bundle "
                + "with a matching pocketllm"
        case .manifestInvalid(let path, let key, let reason):
            return "\(path): \(key): \(reason)"
        case .unsafePath(let key):
            return "manifest.json: files key \"\(key)\" is not a relative path inside the bundle"
        case .fileMissing(let path):
            return "\(path): listed in manifest.json but missing"
        case .sizeMismatch(let path, let actual, let expected):
            return "\(path): size \(actual) does not match manifest.json (\(expected)); the bundle is corrupt or was "
                + "modified, copy it again"
        case .hashMismatch(let path, let actual, let expected):
            return "\(path): sha256 \(actual.prefix(12))... does not match manifest.json (\(expected.prefix(12))...); "
                + "the bundle is corrupt or was modified, copy it again"
        case .unlistedFile(let path, let directory):
            return "\(path): not listed in manifest.json although \(directory) is; the bundle was modified"
        case .targetMissing(let target, let bundle):
            return "\(bundle): manifest.json has no targets.\(target) (export it with --target \(target))"
        case .missingKernels(let ops, let script):
            return "this build lacks the kernels \(ops.joined(separator: ", ")) that the bundle's program calls; "
                + "build the app with \(script), or export the bundle without them"
        case .unsupported(let what, let reason):
            return "\(what): \(reason)"
        case .notEnoughMemory(let needed, let available):
            return "out of memory: the model needs about \(needed) MiB and the app may use \(available) MiB now; "
                + "close other apps or use a smaller (quantized) bundle"
        case .outOfMemory(let context):
            return "out of memory while \(context); close other apps or use a smaller (quantized) bundle"
        case .modelLoadFailed(let target, let reason):
            return "\(target) model failed to load: \(reason)"
        case .tokenizerFailed(let path, let reason):
            return "\(path): tokenizer failed to load (\(reason))"
        case .contextFull(let promptTokens, let maxContext):
            return "the conversation is \(promptTokens) tokens and the model holds \(maxContext); start a new chat"
        case .predictionFailed(let function, let reason):
            return "\(function): prediction failed (\(reason))"
        case .busy:
            return "a generation is already running; stop it first"
        }
    }

    public var errorDescription: String? { description }
}
