import Foundation

/// The pocketllm kernels this app binary links, and what a bundle needs.
///
/// ios_demo/scripts/build_executorch_frameworks.sh builds kernels/ for iOS, links it with -force_load and records the
/// operator names it registered in the build setting POCKETLLM_LINKED_KERNELS, which Info.plist carries as
/// `PocketLLMLinkedKernels` (space-separated). A build without the script links none: stock ExecuTorch.
public struct KernelCheck: Sendable, Equatable {
    public static let infoPlistKey = "PocketLLMLinkedKernels"
    public static let buildScript = "ios_demo/scripts/build_executorch_frameworks.sh"

    public let linked: Set<String>

    public init(linked: Set<String>) {
        self.linked = linked
    }

    /// Parses the Info.plist value ("pocketllm::any4_linear.out pocketllm::infllm_attention.out").
    public init(infoPlistValue: String?) {
        let names = (infoPlistValue ?? "").split(whereSeparator: { $0 == " " || $0 == "," || $0 == "\n" })
        linked = Set(names.map(String.init).filter { !$0.isEmpty && !$0.hasPrefix("$(") })
    }

    /// Operators the bundle's ExecuTorch program calls that this build lacks, sorted.
    public func missing(for target: Manifest.ExecuTorchTarget) -> [String] {
        target.requiresKernels.filter { !linked.contains($0) }.sorted()
    }

    /// Throws .missingKernels naming the operators and the build script when any is missing.
    public func check(_ target: Manifest.ExecuTorchTarget) throws {
        let ops = missing(for: target)
        if !ops.isEmpty { throw PocketLLMError.missingKernels(ops: ops, script: Self.buildScript) }
    }
}
