import Foundation
import XCTest

@testable import PocketLLMCore

/// The Core ML engine's plan comes from the exporter's manifest: every name it uses is one the manifest lists.
final class CoreMLPlanTests: XCTestCase {
    func testPlanUsesTheManifestNames() throws {
        let fixtures = try Fixtures.load()
        for fixture in try fixtures.bundles(target: "coreml") {
            let manifest = try Manifest.load(bundle: fixtures.url(fixture.path))
            let target = try XCTUnwrap(manifest.targets.coreml)
            let plan = try CoreMLPlan(manifest: manifest)
            for (function, spec) in [(plan.prefill, target.functions.prefill), (plan.decode, target.functions.decode)] {
                XCTAssertEqual(function.name, spec.name)
                XCTAssertEqual(Set([function.tokens.name, function.position.name]), Set(spec.inputs.map(\.name)))
                XCTAssertTrue(spec.outputs.map(\.name).contains(function.logitsName))
                XCTAssertEqual(function.logitsShape.last, manifest.model.vocabSize)
            }
            XCTAssertEqual(plan.stateNames, target.states.map(\.name))
            XCTAssertEqual(plan.prefill.tokenCount, target.prefillChunk)
            XCTAssertEqual(plan.decode.tokenCount, 1)
            XCTAssertEqual(plan.limits.maxContext, manifest.model.maxContext)
            XCTAssertEqual(plan.limits.rewindsCache, !(manifest.attention?.hasLightning ?? false))
            XCTAssertEqual(plan.padTokenId, -1)  // pocketllm's packages treat id -1 as padding
            XCTAssertEqual(plan.limits.padsPrefill, target.padsPrefill)
            XCTAssertEqual(plan.packagePath, target.file)
        }
    }

    func testCompiledModelCacheKeyFollowsThePackageFiles() throws {
        let fixtures = try Fixtures.load()
        let fixture = try XCTUnwrap(try fixtures.bundles(target: "coreml").first)
        let bundle = try copyOfBundle(fixtures.url(fixture.path))
        let manifest = try Manifest.load(bundle: bundle)
        let package = try XCTUnwrap(manifest.targets.coreml).file
        let key = CoreMLPlan.cacheKey(manifest: manifest, packagePath: package)
        XCTAssertEqual(key.count, 32)
        XCTAssertEqual(key, CoreMLPlan.cacheKey(manifest: try Manifest.load(bundle: bundle), packagePath: package))
        let changed = try XCTUnwrap(manifest.files(under: package).first)
        try editManifest(bundle) { object in
            var files = object["files"] as? [String: Any] ?? [:]
            files[changed] = ["sha256": String(repeating: "f", count: 64), "size": 1]
            object["files"] = files
        }
        XCTAssertNotEqual(key, CoreMLPlan.cacheKey(manifest: try Manifest.load(bundle: bundle), packagePath: package))
    }

    func testAnInputRoleTheEngineCannotFillIsRefused() throws {
        let fixtures = try Fixtures.load()
        let fixture = try XCTUnwrap(try fixtures.bundles(target: "coreml").first)
        let bundle = try copyOfBundle(fixtures.url(fixture.path))
        try editManifest(bundle) { object in
            guard var targets = object["targets"] as? [String: Any],
                var coreml = targets["coreml"] as? [String: Any],
                var functions = coreml["functions"] as? [String: Any],
                var prefill = functions["prefill"] as? [String: Any],
                var inputs = prefill["inputs"] as? [[String: Any]]
            else { return }
            inputs.append(["name": "causal_mask", "role": "mask", "dtype": "float16", "shape": [1]])
            prefill["inputs"] = inputs
            functions["prefill"] = prefill
            coreml["functions"] = functions
            targets["coreml"] = coreml
            object["targets"] = targets
        }
        let manifest = try Manifest.load(bundle: bundle)
        let index = (manifest.targets.coreml?.functions.prefill.inputs.count ?? 0) - 1
        assertThrows(.manifestInvalid(path: Manifest.fileName, key: "targets.coreml.functions.prefill.inputs[\(index)]",
                                      reason: "role mask is not one this app fills (tokens, position)"))
        {
            _ = try CoreMLPlan(manifest: manifest)
        }
    }

    func testABundleWithoutCoreMLHasNoPlan() throws {
        let fixtures = try Fixtures.load()
        for fixture in fixtures.bundles where fixture.target == "executorch" {
            let manifest = try Manifest.load(bundle: fixtures.url(fixture.path))
            if manifest.targets.coreml != nil { continue }
            assertThrows(.targetMissing(target: "coreml", bundle: manifest.name)) { _ = try CoreMLPlan(manifest: manifest) }
        }
    }
}
