import Foundation

/// How the Core ML engine drives a bundle's model.mlpackage, worked out from manifest `targets.coreml` alone: which
/// function does prefill and which decode (MLModelConfiguration.functionName), the names of their token, position
/// and logits features, the state names, and the fixed shapes. Nothing here is a hard-coded feature name; a manifest
/// the engine cannot drive is refused with the key that is wrong.
public struct CoreMLPlan: Equatable, Sendable {
    /// Input dtypes the engine can fill.
    public static let inputDTypes: Set<String> = ["int32", "float16", "float32"]

    public struct Input: Equatable, Sendable {
        public let name: String
        public let dtype: String
        public let shape: [Int]
        public var count: Int { shape.reduce(1, *) }
    }

    public struct Function: Equatable, Sendable {
        /// The ML program function (MLModelConfiguration.functionName).
        public let name: String
        public let tokens: Input
        /// Either one element (the start position) or one per token (positions start..<start+T).
        public let position: Input
        public let logitsName: String
        public let logitsShape: [Int]
        /// Tokens per call (the token input's element count).
        public var tokenCount: Int { tokens.count }
        /// Rows of logits per call: tokenCount (every position) or 1 (the last position only).
        public let logitsRows: Int
    }

    public let packagePath: String
    public let prefill: Function
    public let decode: Function
    public let stateNames: [String]
    public let limits: ModelLimits
    /// Token id that pads a short prefill tail (targets.coreml.pad_token_id; 0 when the manifest has none).
    public let padTokenId: Int

    public init(manifest: Manifest) throws {
        guard let target = manifest.targets.coreml else {
            throw PocketLLMError.targetMissing(target: TargetKind.coreml.rawValue, bundle: manifest.name)
        }
        let vocab = manifest.model.vocabSize
        let prefill = try Self.function(target.functions.prefill, key: "targets.coreml.functions.prefill", vocab: vocab)
        let decode = try Self.function(target.functions.decode, key: "targets.coreml.functions.decode", vocab: vocab)
        guard decode.tokenCount == 1 else {
            throw Self.invalid("targets.coreml.functions.decode", "takes \(decode.tokenCount) tokens per call, expected 1")
        }
        guard prefill.tokenCount == target.prefillChunk else {
            throw Self.invalid("targets.coreml.functions.prefill",
                               "takes \(prefill.tokenCount) tokens per call but prefill_chunk is \(target.prefillChunk)")
        }
        guard decode.logitsRows == 1 else {
            throw Self.invalid("targets.coreml.functions.decode.outputs",
                               "returns \(decode.logitsRows) rows of logits, expected 1")
        }
        let stateNames = target.states.map(\.name)
        if stateNames.isEmpty {
            throw Self.invalid("targets.coreml.states", "is empty: the engine carries the KV cache in Core ML states")
        }
        // A recurrent (lightning) state would absorb padding tokens and cannot be rewound; position-indexed KV rows
        // past the current position are masked by position and overwritten later, so they can be padded and rewound.
        let recurrent = manifest.attention?.hasLightning ?? false
        self.packagePath = target.file
        self.prefill = prefill
        self.decode = decode
        self.stateNames = stateNames
        self.padTokenId = target.padTokenId ?? 0
        self.limits = ModelLimits(
            maxContext: manifest.model.maxContext,
            prefillChunk: prefill.tokenCount,
            vocabSize: vocab,
            padsPrefill: (target.padsPrefill ?? !recurrent) && !recurrent && prefill.logitsRows == prefill.tokenCount,
            rewindsCache: (target.rewinds ?? !recurrent) && !recurrent)
    }

    /// Directory name for the compiled model (.mlmodelc) cache: changes whenever a file of the package changes.
    public static func cacheKey(manifest: Manifest, packagePath: String) -> String {
        var lines = ""
        for key in manifest.files(under: packagePath) {
            lines += key + " " + (manifest.files[key]?.sha256 ?? "") + "\n"
        }
        return String(StreamingSHA256.hex(of: Data(lines.utf8)).prefix(32))
    }

    private static func function(_ f: Manifest.CoreMLTarget.Function, key: String, vocab: Int) throws -> Function {
        var tokensInput: Input?
        var positionInput: Input?
        for (i, input) in f.inputs.enumerated() {
            let inputKey = "\(key).inputs[\(i)]"
            let resolved = try Self.input(input, key: inputKey)
            switch input.role {
            case "tokens":
                if tokensInput != nil { throw invalid(inputKey, "a second input with role tokens") }
                tokensInput = resolved
            case "position":
                if positionInput != nil { throw invalid(inputKey, "a second input with role position") }
                positionInput = resolved
            default:
                let role = input.role ?? "null"
                throw invalid(inputKey, "role \(role) is not one this app fills (tokens, position)")
            }
        }
        guard let tokens = tokensInput else { throw invalid("\(key).inputs", "no input with role tokens") }
        guard let position = positionInput else { throw invalid("\(key).inputs", "no input with role position") }
        if position.name == tokens.name {
            throw invalid("\(key).inputs", "the tokens and position inputs are both named \(tokens.name)")
        }
        if position.count != 1 && position.count != tokens.count {
            throw invalid("\(key).inputs", "position input \(position.name) has \(position.count) elements, expected 1 "
                              + "or \(tokens.count)")
        }
        let logits = f.outputs.enumerated().filter { $0.element.role == "logits" }
        guard logits.count == 1, let first = logits.first else {
            throw invalid("\(key).outputs", "expected exactly one output with role logits, found \(logits.count)")
        }
        let index = first.offset
        let output = first.element
        let shape = try fixedShape(output.shape, key: "\(key).outputs[\(index)].shape")
        guard let last = shape.last, last == vocab else {
            throw invalid("\(key).outputs[\(index)].shape", "last dimension must be model.vocab_size \(vocab)")
        }
        let rows = shape.dropLast().reduce(1, *)
        guard rows == 1 || rows == tokens.count else {
            throw invalid("\(key).outputs[\(index)].shape", "\(rows) rows of logits for \(tokens.count) tokens")
        }
        return Function(name: f.name, tokens: tokens, position: position, logitsName: output.name,
                        logitsShape: shape, logitsRows: rows)
    }

    private static func input(_ spec: Manifest.TensorSpec, key: String) throws -> Input {
        guard inputDTypes.contains(spec.dtype) else {
            throw invalid("\(key).dtype", "\(spec.dtype) is not one this app fills (\(inputDTypes.sorted().joined(separator: ", ")))")
        }
        return Input(name: spec.name, dtype: spec.dtype, shape: try fixedShape(spec.shape, key: "\(key).shape"))
    }

    private static func fixedShape(_ dims: [ShapeDimension], key: String) throws -> [Int] {
        var shape: [Int] = []
        for dim in dims {
            guard let n = dim.value, n > 0 else {
                throw invalid(key, "dimension \(dim) is not a fixed size (Core ML functions have fixed shapes)")
            }
            shape.append(n)
        }
        return shape
    }

    private static func invalid(_ key: String, _ reason: String) -> PocketLLMError {
        PocketLLMError.manifestInvalid(path: Manifest.fileName, key: key, reason: reason)
    }
}
