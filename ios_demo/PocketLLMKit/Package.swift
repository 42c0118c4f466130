// swift-tools-version: 5.10
// PocketLLMKit: what the iOS app knows about pocketllm bundles.
//
//   PocketLLMCore     plain Swift + Foundation (also builds with a Linux Swift toolchain): manifest.json model,
//                     sha256 verification, chat formatting, sampling, the generation loop, statistics.
//   PocketLLMEngines  Apple-only: the Core ML engine (MLModel + MLState) and the ExecuTorch engine (LLM runner),
//                     swift-transformers' Tokenizers on the bundle's tokenizer.json.
//
// POCKETLLM_CORE_ONLY=1 (what tests/apps/test_ios_sources.py sets) declares PocketLLMCore and its tests only, so
// `swift build` / `swift test` need no network and no Apple SDK. Without a Darwin host the engines are left out too.
import Foundation
import PackageDescription

let coreOnly = ProcessInfo.processInfo.environment["POCKETLLM_CORE_ONLY"] == "1"

// Swift 6 concurrency checking, reported as warnings under the 5.10 language mode.
let strictConcurrency: [SwiftSetting] = [.enableExperimentalFeature("StrictConcurrency")]

var products: [Product] = [
    .library(name: "PocketLLMCore", targets: ["PocketLLMCore"])
]
var dependencies: [Package.Dependency] = []
var targets: [Target] = [
    .target(name: "PocketLLMCore", swiftSettings: strictConcurrency),
    .testTarget(name: "PocketLLMCoreTests", dependencies: ["PocketLLMCore"], swiftSettings: strictConcurrency),
]

#if canImport(Darwin)
if !coreOnly {
    products.append(.library(name: "PocketLLMEngines", targets: ["PocketLLMEngines"]))
    dependencies += [
        // Tokenizers: loads a local tokenizer.json, no network (AutoTokenizer.from(modelFolder:)).
        .package(url: "https://github.com/huggingface/swift-transformers", exact: "1.3.3"),
        // Prebuilt ExecuTorch xcframeworks, same version as the executorch pip wheel the exporter uses (1.5.1).
        // Branch naming: "swiftpm-<version>" (docs/source/using-executorch-ios.md).
        .package(url: "https://github.com/pytorch/executorch", branch: "swiftpm-1.5.1"),
    ]
    targets.append(
        .target(
            name: "PocketLLMEngines",
            dependencies: [
                "PocketLLMCore",
                .product(name: "Tokenizers", package: "swift-transformers"),
                .product(name: "executorch_llm", package: "executorch"),
                .product(name: "backend_xnnpack", package: "executorch"),
                .product(name: "kernels_llm", package: "executorch"),
                .product(name: "kernels_optimized", package: "executorch"),
                .product(name: "kernels_quantized", package: "executorch"),
            ],
            swiftSettings: strictConcurrency
        ))
}
#endif

let package = Package(
    name: "PocketLLMKit",
    // String forms: the .v18 / .v15 constants need tools version 6.0.
    platforms: [.iOS("18.0"), .macOS("15.0")],
    products: products,
    dependencies: dependencies,
    targets: targets
)
