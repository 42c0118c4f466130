import Foundation

/// A bundle's manifest.json, schema_version 2: the contract in the repository's JSON Schema
/// (export/bundle/manifest.schema.json) and CONTRACTS.md. Only what an app reads is decoded; other keys (spec,
/// export timings, parity, reference) are ignored. Keys are spelled out: JSONDecoder's convertFromSnakeCase would also
/// rewrite the keys of `files` ("tokenizer_config.json").
public struct Manifest: Decodable, Equatable, Sendable {
    public static let supportedSchemaVersion = 2
    public static let fileName = "manifest.json"

    public let schemaVersion: Int
    public let generator: Generator?
    public let name: String
    public let architecture: String
    public let modelType: String?
    public let model: ModelInfo
    public let tokenizer: TokenizerInfo
    public let chat: ChatTemplate?
    public let quantization: Quantization
    public let attention: Attention?
    public let targets: Targets
    /// Every runtime file: relative POSIX path -> sha256 and size.
    public let files: [String: FileEntry]

    enum CodingKeys: String, CodingKey {
        case schemaVersion = "schema_version"
        case generator, name, architecture
        case modelType = "model_type"
        case model, tokenizer, chat, quantization, attention, targets, files
    }

    public struct Generator: Decodable, Equatable, Sendable {
        public let name: String
        public let version: String
    }

    public struct ModelInfo: Decodable, Equatable, Sendable {
        public let vocabSize: Int
        public let hiddenSize: Int
        public let numLayers: Int
        public let numHeads: Int
        public let numKVHeads: Int
        public let headDim: Int
        public let maxContext: Int
        public let maxPositionEmbeddings: Int
        public let prefillChunk: Int

        enum CodingKeys: String, CodingKey {
            case vocabSize = "vocab_size"
            case hiddenSize = "hidden_size"
            case numLayers = "num_layers"
            case numHeads = "num_heads"
            case numKVHeads = "num_kv_heads"
            case headDim = "head_dim"
            case maxContext = "max_context"
            case maxPositionEmbeddings = "max_position_embeddings"
            case prefillChunk = "prefill_chunk"
        }
    }

    public struct TokenizerInfo: Decodable, Equatable, Sendable {
        public let files: [String]
        /// "huggingface" (tokenizer.json) or "sentencepiece" (tokenizer.model).
        public let kind: String
        /// The file a runtime loads.
        public let file: String
        public let bosID: Int?
        public let eosIDs: [Int]
        /// BOS tokens to put before the prompt (ExecuTorch's runner: GenerationConfig.num_bos).
        public let numBOS: Int
        public let chatTemplate: String?

        enum CodingKeys: String, CodingKey {
            case files, kind, file
            case bosID = "bos_id"
            case eosIDs = "eos_ids"
            case numBOS = "num_bos"
            case chatTemplate = "chat_template"
        }
    }

    public struct Quantization: Decodable, Equatable, Sendable {
        public let scheme: String
        public let groupSize: Int?
        public let bitsPerWeight: Double?

        enum CodingKeys: String, CodingKey {
            case scheme
            case groupSize = "group_size"
            case bitsPerWeight = "bits_per_weight"
        }
    }

    /// What the engines need to know about attention: a lightning layer keeps a recurrent state, which can neither
    /// absorb padding tokens nor be rewound to an earlier position.
    public struct Attention: Decodable, Equatable, Sendable {
        public let perLayer: [String]
        public let hasLightning: Bool
        public let hasInfLLMv2: Bool

        enum CodingKeys: String, CodingKey {
            case perLayer = "per_layer"
            case lightning
            case infllmV2 = "infllm_v2"
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            func present(_ key: CodingKeys) throws -> Bool {
                guard c.contains(key) else { return false }
                return try !c.decodeNil(forKey: key)
            }
            perLayer = try c.decode([String].self, forKey: .perLayer)
            hasLightning = try present(.lightning)
            hasInfLLMv2 = try present(.infllmV2)
        }
    }

    public struct Targets: Decodable, Equatable, Sendable {
        public let executorch: ExecuTorchTarget?
        public let coreml: CoreMLTarget?
        public let onnx: ONNXTarget?

        /// Target names present, in the order the app offers them.
        public var available: [TargetKind] {
            var kinds: [TargetKind] = []
            if coreml != nil { kinds.append(.coreml) }
            if executorch != nil { kinds.append(.executorch) }
            return kinds
        }
    }

    public struct ExecuTorchTarget: Decodable, Equatable, Sendable {
        public let file: String
        public let methods: [String]?
        /// Operators of the program that stock ExecuTorch lacks ([] = stock ExecuTorch runs it).
        public let requiresKernels: [String]
        public let prefillChunk: Int?

        enum CodingKeys: String, CodingKey {
            case file, methods
            case requiresKernels = "requires_kernels"
            case prefillChunk = "prefill_chunk"
        }
    }

    public struct CoreMLTarget: Decodable, Equatable, Sendable {
        /// The .mlpackage directory.
        public let file: String
        public let deploymentTarget: String?
        public let computePrecision: String?
        public let functions: Functions
        public let states: [TensorSpec]
        public let prefillChunk: Int
        public let requiresKernels: [String]?
        /// Token id that pads a short prefill tail (pocketllm's packages: -1, treated as padding); absent: 0.
        public let padTokenId: Int?
        /// Whether a prompt tail may be padded to a full chunk (false with recurrent state); absent: decided from
        /// the attention kinds.
        public let padsPrefill: Bool?
        /// Whether a call may start at any cached position (false with recurrent state).
        public let rewinds: Bool?

        enum CodingKeys: String, CodingKey {
            case file, functions, states, rewinds
            case deploymentTarget = "deployment_target"
            case computePrecision = "compute_precision"
            case prefillChunk = "prefill_chunk"
            case requiresKernels = "requires_kernels"
            case padTokenId = "pad_token_id"
            case padsPrefill = "pads_prefill"
        }

        public struct Functions: Decodable, Equatable, Sendable {
            public let prefill: Function
            public let decode: Function
        }

        /// One function of the (multifunction) ML program, as MLModelConfiguration.functionName selects it.
        public struct Function: Decodable, Equatable, Sendable {
            public let name: String
            public let inputs: [TensorSpec]
            public let outputs: [TensorSpec]
        }
    }

    public struct ONNXTarget: Decodable, Equatable, Sendable {
        public let file: String
    }

    /// A named tensor: a function input/output (with its role) or a state.
    public struct TensorSpec: Decodable, Equatable, Sendable {
        public let name: String
        /// "tokens" | "position" for inputs, "logits" for outputs; nil for states.
        public let role: String?
        public let dtype: String
        public let shape: [ShapeDimension]
    }

    public struct FileEntry: Decodable, Equatable, Sendable {
        public let sha256: String
        public let size: Int64
    }
}

/// One dimension of a shape: a number, or a symbol such as "T" (a dynamic token count).
public enum ShapeDimension: Decodable, Equatable, Sendable, CustomStringConvertible {
    case fixed(Int)
    case symbolic(String)

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let n = try? c.decode(Int.self) {
            self = .fixed(n)
        } else {
            self = .symbolic(try c.decode(String.self))
        }
    }

    public var value: Int? {
        if case .fixed(let n) = self { return n }
        return nil
    }

    public var description: String {
        switch self {
        case .fixed(let n): return String(n)
        case .symbolic(let s): return s
        }
    }
}

public enum TargetKind: String, CaseIterable, Sendable, Identifiable {
    case coreml
    case executorch

    public var id: String { rawValue }
    public var displayName: String {
        switch self {
        case .coreml: return "Core ML"
        case .executorch: return "ExecuTorch"
        }
    }
}

/// The chat formatting the exporter rendered from the checkpoint's Jinja template (so apps need no Jinja).
public struct ChatTemplate: Decodable, Equatable, Sendable {
    public struct Affixes: Decodable, Equatable, Sendable {
        public let prefix: String
        public let suffix: String

        public init(prefix: String, suffix: String) {
            self.prefix = prefix
            self.suffix = suffix
        }
    }

    /// "system" / "user" / "assistant" -> prefix and suffix around the message content.
    public let roles: [String: Affixes]
    /// Appended after the last message to ask for a reply.
    public let generationPrefix: String
    /// Token ids that end an assistant turn.
    public let stopIDs: [Int]

    enum CodingKeys: String, CodingKey {
        case roles
        case generationPrefix = "generation_prefix"
        case stopIDs = "stop_ids"
    }

    public init(roles: [String: Affixes], generationPrefix: String, stopIDs: [Int]) {
        self.roles = roles
        self.generationPrefix = generationPrefix
        self.stopIDs = stopIDs
    }
}

// MARK: - Loading

extension Manifest {
    /// Reads `bundle/manifest.json`. Refuses an unknown schema_version before anything else, then decodes; a missing
    /// or mistyped key is reported with its path ("targets.coreml.functions.prefill.name").
    public static func load(bundle: URL) throws -> Manifest {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: bundle.path, isDirectory: &isDirectory), isDirectory.boolValue
        else {
            throw PocketLLMError.bundleNotFound(path: bundle.path)
        }
        let url = bundle.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw PocketLLMError.manifestMissing(path: url.path)
        }
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw PocketLLMError.manifestUnreadable(path: url.path, reason: error.localizedDescription)
        }
        return try decode(data, path: url.path)
    }

    public static func decode(_ data: Data, path: String) throws -> Manifest {
        let object: Any
        do {
            object = try JSONSerialization.jsonObject(with: data)
        } catch {
            throw PocketLLMError.manifestUnreadable(path: path, reason: "not valid JSON")
        }
        guard let top = object as? [String: Any] else {
            throw PocketLLMError.manifestUnreadable(path: path, reason: "not a JSON object")
        }
        let version = top["schema_version"]
        guard let number = version as? Int, number == supportedSchemaVersion else {
            let found: String
            if let text = version as? String {
                found = "\"\(text)\""
            } else {
                found = version.map { String(describing: $0) } ?? "(missing)"
            }
            throw PocketLLMError.unknownSchemaVersion(path: path, found: found, supported: supportedSchemaVersion)
        }
        do {
            return try JSONDecoder().decode(Manifest.self, from: data)
        } catch let error as DecodingError {
            let (key, reason) = describe(error)
            throw PocketLLMError.manifestInvalid(path: path, key: key, reason: reason)
        }
    }

    /// The bundle-relative path of the model file of `target`, and whether it is a directory (an .mlpackage).
    public func artifact(for target: TargetKind) -> (path: String, isDirectory: Bool)? {
        switch target {
        case .coreml:
            guard let coreml = targets.coreml else { return nil }
            return (path: coreml.file, isDirectory: true)
        case .executorch:
            guard let executorch = targets.executorch else { return nil }
            return (path: executorch.file, isDirectory: false)
        }
    }

    /// The files listed under a directory of the bundle ("model.mlpackage/...").
    public func files(under directory: String) -> [String] {
        let prefix = directory.hasSuffix("/") ? directory : directory + "/"
        return files.keys.filter { $0.hasPrefix(prefix) }.sorted()
    }

    /// Token ids that end generation: the chat template's stop ids when chatting with the template, otherwise the
    /// tokenizer's EOS ids (stop_ids is a subset of eos_ids, so the union is the same set either way).
    public func stopTokenIDs(useTemplate: Bool) -> Set<Int> {
        var ids = Set(tokenizer.eosIDs)
        if useTemplate, let chat { ids.formUnion(chat.stopIDs) }
        return ids
    }
}

private func describe(_ error: DecodingError) -> (key: String, reason: String) {
    func path(_ codingPath: [CodingKey], _ last: CodingKey? = nil) -> String {
        let keys = codingPath + (last.map { [$0] } ?? [])
        var out = ""
        for key in keys {
            if let index = key.intValue {
                out += "[\(index)]"
            } else {
                out += out.isEmpty ? key.stringValue : "." + key.stringValue
            }
        }
        return out.isEmpty ? "(top level)" : out
    }
    switch error {
    case .keyNotFound(let key, let context):
        return (path(context.codingPath, key), "missing")
    case .typeMismatch(let type, let context):
        return (path(context.codingPath), "expected \(type)")
    case .valueNotFound(let type, let context):
        return (path(context.codingPath), "expected \(type), found null")
    case .dataCorrupted(let context):
        return (path(context.codingPath), context.debugDescription)
    @unknown default:
        return ("(unknown)", String(describing: error))
    }
}
