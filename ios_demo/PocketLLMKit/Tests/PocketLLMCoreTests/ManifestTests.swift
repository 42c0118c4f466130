import Foundation
import XCTest

@testable import PocketLLMCore

/// manifest.json as the exporter writes it decodes into the Codable model with the values Python reads from it.
final class ManifestTests: XCTestCase {
    func testExporterManifestsDecodeWithThePythonValues() throws {
        let fixtures = try Fixtures.load()
        XCTAssertFalse(fixtures.bundles.isEmpty)
        for expected in fixtures.bundles {
            let manifest = try Manifest.load(bundle: fixtures.url(expected.path))
            XCTAssertEqual(manifest.schemaVersion, Manifest.supportedSchemaVersion)
            XCTAssertEqual(manifest.name, expected.name)
            XCTAssertEqual(manifest.model.vocabSize, expected.vocabSize)
            XCTAssertEqual(manifest.model.maxContext, expected.maxContext)
            XCTAssertEqual(manifest.tokenizer.eosIDs, expected.eosIDs)
            XCTAssertEqual(manifest.files.count, expected.fileCount)
            switch expected.target {
            case "executorch":
                let target = try XCTUnwrap(manifest.targets.executorch)
                XCTAssertEqual(target.requiresKernels, expected.requiresKernels)
                XCTAssertNotNil(manifest.files[target.file], "the .pte is listed in files")
            case "coreml":
                let target = try XCTUnwrap(manifest.targets.coreml)
                XCTAssertFalse(manifest.files(under: target.file).isEmpty, "the .mlpackage files are listed")
            default:
                XCTFail("unexpected fixture target \(expected.target)")
            }
            if let onnx = manifest.targets.onnx {  // an ONNX folder beside the app's target: decoded, not offered
                XCTAssertNotNil(manifest.files[onnx.file], "the ONNX model is listed in files")
                XCTAssertFalse(manifest.targets.available.isEmpty)
            }
        }
    }

    func testUnknownSchemaVersionIsRefusedBeforeDecoding() throws {
        let fixtures = try Fixtures.load()
        let bundle = try copyOfBundle(fixtures.url(fixtures.bundles[0].path))
        try editManifest(bundle) { object in
            object["schema_version"] = 3
            object["model"] = nil  // would be a decoding error, but the version is checked first
        }
        let path = bundle.appendingPathComponent(Manifest.fileName).path
        assertThrows(.unknownSchemaVersion(path: path, found: "3", supported: 2)) {
            _ = try Manifest.load(bundle: bundle)
        }
        try editManifest(bundle) { object in object["schema_version"] = nil }
        assertThrows(.unknownSchemaVersion(path: path, found: "(missing)", supported: 2)) {
            _ = try Manifest.load(bundle: bundle)
        }
    }

    func testMissingKeyIsNamedWithItsPath() throws {
        let fixtures = try Fixtures.load()
        let bundle = try copyOfBundle(fixtures.url(fixtures.bundles[0].path))
        try editManifest(bundle) { object in
            guard var model = object["model"] as? [String: Any] else { return }
            model["max_context"] = nil
            object["model"] = model
        }
        let path = bundle.appendingPathComponent(Manifest.fileName).path
        assertThrows(.manifestInvalid(path: path, key: "model.max_context", reason: "missing")) {
            _ = try Manifest.load(bundle: bundle)
        }
    }

    func testNotABundle() throws {
        let empty = FileManager.default.temporaryDirectory.appendingPathComponent("pocketllm-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: empty, withIntermediateDirectories: true)
        let manifestPath = empty.appendingPathComponent(Manifest.fileName).path
        assertThrows(.manifestMissing(path: manifestPath)) { _ = try Manifest.load(bundle: empty) }
        let missing = empty.appendingPathComponent("nothing-here")
        assertThrows(.bundleNotFound(path: missing.path)) { _ = try Manifest.load(bundle: missing) }
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: manifestPath))
        assertThrows(.manifestUnreadable(path: manifestPath, reason: "not valid JSON")) {
            _ = try Manifest.load(bundle: empty)
        }
    }

    func testStopTokensAreTheChatStopIDsAndEOS() throws {
        let fixtures = try Fixtures.load()
        for expected in fixtures.bundles {
            let manifest = try Manifest.load(bundle: fixtures.url(expected.path))
            XCTAssertEqual(manifest.stopTokenIDs(useTemplate: false), Set(expected.eosIDs))
            if let chat = manifest.chat {
                XCTAssertTrue(Set(chat.stopIDs).isSubset(of: Set(expected.eosIDs)), "stop_ids is a subset of eos_ids")
                XCTAssertEqual(manifest.stopTokenIDs(useTemplate: true), Set(expected.eosIDs))
            }
        }
    }
}
