@preconcurrency import CoreML
import Foundation
import PocketLLMCore

extension ComputeUnits {
    public var mlComputeUnits: MLComputeUnits {
        switch self {
        case .cpuOnly: return .cpuOnly
        case .cpuAndGPU: return .cpuAndGPU
        case .all: return .all
        }
    }
}

/// Compiled models (.mlmodelc) of imported bundles, kept in Application Support so each package is compiled once
/// (MLModel.compileModel(at:) on first use). The directory name is a hash of the package's manifest entries, so an
/// updated bundle compiles again.
public actor CompiledModelCache {
    public let root: URL

    public init(root: URL) {
        self.root = root
    }

    public static func applicationSupport() throws -> CompiledModelCache {
        let base = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask,
                                               appropriateFor: nil, create: true)
        return CompiledModelCache(root: base.appendingPathComponent("CompiledModels", isDirectory: true))
    }

    public func compiledModel(packageURL: URL, key: String) async throws -> URL {
        let destination = root.appendingPathComponent("\(key).mlmodelc", isDirectory: true)
        if FileManager.default.fileExists(atPath: destination.path) { return destination }
        let compiled: URL
        do {
            compiled = try await MLModel.compileModel(at: packageURL)
        } catch {
            throw PocketLLMError.modelLoadFailed(target: "Core ML",
                                                 reason: "compiling \(packageURL.lastPathComponent): \(error.localizedDescription)")
        }
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        // Compiled into a temporary directory: move it into place (replacing a half-written leftover).
        if FileManager.default.fileExists(atPath: destination.path) {
            try FileManager.default.removeItem(at: destination)
        }
        try FileManager.default.moveItem(at: compiled, to: destination)
        return destination
    }

    /// Removes every compiled model except `keep` (keys of bundles still present).
    public func prune(keeping keep: Set<String>) {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? []
        for name in names where name.hasSuffix(".mlmodelc") && !keep.contains(String(name.dropLast(9))) {
            try? FileManager.default.removeItem(at: root.appendingPathComponent(name))
        }
    }
}

/// A bundle's model.mlpackage as a LogitsModel: two functions of one ML program (prefill chunk, one-token decode),
/// each loaded as its own MLModel through MLModelConfiguration.functionName, sharing one MLState (the KV cache) made
/// by makeState(). Feature, function and state names all come from the manifest (CoreMLPlan); loading checks that
/// the compiled model declares exactly those names.
public actor CoreMLLanguageModel: LogitsModel {
    public nonisolated let limits: ModelLimits
    private let plan: CoreMLPlan
    private let prefillModel: MLModel
    private let decodeModel: MLModel
    private var state: MLState

    public init(bundle: URL, manifest: Manifest, computeUnits: ComputeUnits, cache: CompiledModelCache) async throws {
        let plan = try CoreMLPlan(manifest: manifest)
        let packageURL = bundle.appendingPathComponent(plan.packagePath, isDirectory: true)
        let compiled = try await cache.compiledModel(
            packageURL: packageURL, key: CoreMLPlan.cacheKey(manifest: manifest, packagePath: plan.packagePath))
        let prefillModel = try await Self.load(compiled, function: plan.prefill.name, computeUnits: computeUnits)
        let decodeModel = try await Self.load(compiled, function: plan.decode.name, computeUnits: computeUnits)
        try Self.check(prefillModel, plan.prefill, states: plan.stateNames)
        try Self.check(decodeModel, plan.decode, states: plan.stateNames)
        self.plan = plan
        self.limits = plan.limits
        self.prefillModel = prefillModel
        self.decodeModel = decodeModel
        self.state = decodeModel.makeState()
    }

    private static func load(_ compiled: URL, function: String, computeUnits: ComputeUnits) async throws -> MLModel {
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits.mlComputeUnits
        configuration.functionName = function
        do {
            return try await MLModel.load(contentsOf: compiled, configuration: configuration)
        } catch {
            throw PocketLLMError.modelLoadFailed(target: "Core ML",
                                                 reason: "function \(function): \(error.localizedDescription)")
        }
    }

    /// The compiled function declares the inputs, the logits output and the states the manifest names.
    private static func check(_ model: MLModel, _ function: CoreMLPlan.Function, states: [String]) throws {
        let description = model.modelDescription
        let inputs = Set(description.inputDescriptionsByName.keys)
        let expectedInputs: Set<String> = [function.tokens.name, function.position.name]
        guard inputs == expectedInputs else {
            throw PocketLLMError.modelLoadFailed(
                target: "Core ML", reason: "function \(function.name) has inputs \(inputs.sorted()), manifest.json "
                    + "names \(expectedInputs.sorted())")
        }
        guard description.outputDescriptionsByName[function.logitsName] != nil else {
            throw PocketLLMError.modelLoadFailed(
                target: "Core ML", reason: "function \(function.name) has no output \(function.logitsName)")
        }
        let declared = Set(description.stateDescriptionsByName.keys)
        guard declared == Set(states) else {
            throw PocketLLMError.modelLoadFailed(
                target: "Core ML", reason: "function \(function.name) has states \(declared.sorted()), manifest.json "
                    + "names \(states.sorted())")
        }
    }

    public func resetCache() async throws {
        state = decodeModel.makeState()
    }

    public func prefill(_ tokens: [Int], at start: Int) async throws -> [Float] {
        let function = plan.prefill
        guard !tokens.isEmpty, tokens.count <= function.tokenCount,
            tokens.count == function.tokenCount || limits.padsPrefill
        else {
            throw PocketLLMError.predictionFailed(
                function: function.name, reason: "\(tokens.count) tokens for a \(function.tokenCount)-token chunk")
        }
        // Pad a short tail with the manifest's pad id (-1 for pocketllm's packages, which then know the real token
        // count): its cache rows lie past the prompt, masked by position and overwritten later.
        let padded = tokens + Array(repeating: plan.padTokenId, count: function.tokenCount - tokens.count)
        let output = try await predict(prefillModel, function, tokens: padded, start: start)
        let row = function.logitsRows == 1 ? 0 : tokens.count - 1
        return try Self.logits(output, function, row: row)
    }

    public func decode(_ token: Int, at position: Int) async throws -> [Float] {
        let output = try await predict(decodeModel, plan.decode, tokens: [token], start: position)
        return try Self.logits(output, plan.decode, row: 0)
    }

    private func predict(_ model: MLModel, _ function: CoreMLPlan.Function, tokens: [Int], start: Int) async throws
        -> MLFeatureProvider
    {
        let positions: [Int] = function.position.count == 1 ? [start] : Array(start..<start + tokens.count)
        do {
            let features = try MLDictionaryFeatureProvider(dictionary: [
                function.tokens.name: MLFeatureValue(multiArray: try Self.multiArray(function.tokens, values: tokens)),
                function.position.name: MLFeatureValue(multiArray: try Self.multiArray(function.position, values: positions)),
            ])
            return try await model.prediction(from: features, using: state, options: MLPredictionOptions())
        } catch let error as PocketLLMError {
            throw error
        } catch {
            throw PocketLLMError.predictionFailed(function: function.name, reason: error.localizedDescription)
        }
    }

    /// An input array of the manifest's shape and dtype holding `values` in row-major order (strides honored).
    private static func multiArray(_ input: CoreMLPlan.Input, values: [Int]) throws -> MLMultiArray {
        guard values.count == input.count else {
            throw PocketLLMError.predictionFailed(
                function: input.name, reason: "\(values.count) values for shape \(input.shape)")
        }
        let dataType: MLMultiArrayDataType
        switch input.dtype {
        case "int32": dataType = .int32
        case "float16": dataType = .float16
        default: dataType = .float32
        }
        let array = try MLMultiArray(shape: input.shape.map { NSNumber(value: $0) }, dataType: dataType)
        let shape = input.shape
        array.withUnsafeMutableBytes { raw, strides in
            for (flat, value) in values.enumerated() {
                let offset = Self.offset(flat: flat, shape: shape, strides: strides)
                switch dataType {
                case .int32: raw.storeBytes(of: Int32(truncatingIfNeeded: value), toByteOffset: offset * 4, as: Int32.self)
                case .float16: raw.storeBytes(of: HalfFloat.fromFloat(Float(value)), toByteOffset: offset * 2, as: UInt16.self)
                default: raw.storeBytes(of: Float(value), toByteOffset: offset * 4, as: Float.self)
                }
            }
        }
        return array
    }

    /// Element offset of the row-major index `flat` in an array of `shape` laid out with `strides`.
    private static func offset(flat: Int, shape: [Int], strides: [Int]) -> Int {
        var rest = flat
        var offset = 0
        for axis in stride(from: shape.count - 1, through: 0, by: -1) {
            let size = max(1, shape[axis])
            offset += (rest % size) * strides[axis]
            rest /= size
        }
        return offset
    }

    /// Row `row` of the logits output as Float, reading fp16 or fp32 with the array's real strides (Core ML may pad
    /// rows for the Neural Engine).
    private static func logits(_ output: MLFeatureProvider, _ function: CoreMLPlan.Function, row: Int) throws
        -> [Float]
    {
        guard let array = output.featureValue(for: function.logitsName)?.multiArrayValue else {
            throw PocketLLMError.predictionFailed(function: function.name,
                                                  reason: "no multiarray output \(function.logitsName)")
        }
        let shape = array.shape.map(\.intValue)
        let strides = array.strides.map(\.intValue)
        guard let vocab = shape.last, shape.count == strides.count,
            shape.dropLast().reduce(1, *) == function.logitsRows
        else {
            throw PocketLLMError.predictionFailed(
                function: function.name, reason: "\(function.logitsName) has shape \(shape), manifest.json says "
                    + "\(function.logitsShape)")
        }
        let rowOffset = offset(flat: row * vocab, shape: shape, strides: strides)
        let step = strides[strides.count - 1]
        var result = [Float](repeating: 0, count: vocab)
        switch array.dataType {
        case .float32:
            array.withUnsafeBytes { raw in
                for i in 0..<vocab {
                    result[i] = raw.load(fromByteOffset: (rowOffset + i * step) * 4, as: Float.self)
                }
            }
        case .float16:
            array.withUnsafeBytes { raw in
                for i in 0..<vocab {
                    result[i] = HalfFloat.toFloat(raw.load(fromByteOffset: (rowOffset + i * step) * 2, as: UInt16.self))
                }
            }
        default:
            throw PocketLLMError.predictionFailed(
                function: function.name, reason: "\(function.logitsName) has data type \(array.dataType.rawValue), "
                    + "expected float16 or float32")
        }
        return result
    }
}
