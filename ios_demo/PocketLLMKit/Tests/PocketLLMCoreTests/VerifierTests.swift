import Foundation
import XCTest

@testable import PocketLLMCore

/// Verification of exporter-written bundles: an untouched one passes with progress up to the listed total; a flipped
/// byte, a truncated file, a missing file, an added file in the model directory and a path escaping the bundle are
/// each refused, naming the file.
final class VerifierTests: XCTestCase {
    func testUntouchedBundlesVerifyWithProgressToTheTotal() throws {
        let fixtures = try Fixtures.load()
        for fixture in fixtures.bundles {
            let bundle = fixtures.url(fixture.path)
            let manifest = try Manifest.load(bundle: bundle)
            var updates: [VerificationProgress] = []
            // A small chunk so that every file reports several times.
            try BundleVerifier(bundle: bundle, manifest: manifest, chunkSize: 64 << 10).verify { updates.append($0) }
            let total = manifest.files.values.reduce(Int64(0)) { $0 + $1.size }
            XCTAssertEqual(updates.last?.bytesDone, total)
            XCTAssertEqual(updates.last?.filesDone, manifest.files.count)
            XCTAssertEqual(updates.last?.fraction, 1)
            XCTAssertGreaterThan(updates.count, manifest.files.count)
            XCTAssertEqual(updates.map(\.bytesDone), updates.map(\.bytesDone).sorted(), "progress never goes back")
        }
    }

    func testFlippedByteIsAHashMismatchNamingTheFile() throws {
        let fixtures = try Fixtures.load()
        let bundle = try copyOfBundle(fixtures.url(fixtures.bundles[0].path))
        let manifest = try Manifest.load(bundle: bundle)
        let victim = "tokenizer.json"
        let entry = try XCTUnwrap(manifest.files[victim])
        let url = bundle.appendingPathComponent(victim)
        var bytes = try Data(contentsOf: url)
        bytes[bytes.count / 2] ^= 0x01  // same size, different content
        try bytes.write(to: url)
        let actual = StreamingSHA256.hex(of: bytes)
        assertThrows(.hashMismatch(path: victim, actual: actual, expected: entry.sha256)) {
            try BundleVerifier(bundle: bundle, manifest: manifest).verify()
        }
    }

    func testTruncatedModelIsASizeMismatch() throws {
        let fixtures = try Fixtures.load()
        for fixture in fixtures.bundles {
            let bundle = try copyOfBundle(fixtures.url(fixture.path))
            let manifest = try Manifest.load(bundle: bundle)
            // The largest file: the weights.
            guard let largest = manifest.files.max(by: { $0.value.size < $1.value.size }) else {
                return XCTFail("no files")
            }
            let key = largest.key
            let entry = largest.value
            let url = bundle.appendingPathComponent(key)
            let handle = try FileHandle(forWritingTo: url)
            try handle.truncate(atOffset: UInt64(entry.size - 1))
            try handle.close()
            assertThrows(.sizeMismatch(path: key, actual: entry.size - 1, expected: entry.size)) {
                try BundleVerifier(bundle: bundle, manifest: manifest).verify()
            }
        }
    }

    func testMissingFile() throws {
        let fixtures = try Fixtures.load()
        let bundle = try copyOfBundle(fixtures.url(fixtures.bundles[0].path))
        let manifest = try Manifest.load(bundle: bundle)
        try FileManager.default.removeItem(at: bundle.appendingPathComponent("tokenizer.json"))
        assertThrows(.fileMissing(path: "tokenizer.json")) {
            try BundleVerifier(bundle: bundle, manifest: manifest).verify()
        }
    }

    func testFileAddedToTheModelPackageIsRefused() throws {
        let fixtures = try Fixtures.load()
        let fixture = try XCTUnwrap(try fixtures.bundles(target: "coreml").first)
        let bundle = try copyOfBundle(fixtures.url(fixture.path))
        let manifest = try Manifest.load(bundle: bundle)
        let package = try XCTUnwrap(manifest.targets.coreml).file
        let added = package + "/Data/extra.bin"
        try Data([1, 2, 3]).write(to: bundle.appendingPathComponent(added))
        assertThrows(.unlistedFile(path: added, directory: package)) {
            try BundleVerifier(bundle: bundle, manifest: manifest).verify()
        }
    }

    func testPathsOutsideTheBundleAreRefused() throws {
        for key in ["../escape.bin", "/etc/passwd", "a/../../b", "", "a//b", "./model.pte", "dir\\file"] {
            assertThrows(.unsafePath(key: key)) { try BundleVerifier.checkRelativePath(key) }
        }
        for key in ["model.pte", "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin", "onnx/model.onnx"] {
            XCTAssertNoThrow(try BundleVerifier.checkRelativePath(key))
        }
    }

    func testEscapingKeyInAManifestStopsVerification() throws {
        let fixtures = try Fixtures.load()
        let bundle = try copyOfBundle(fixtures.url(fixtures.bundles[0].path))
        try editManifest(bundle) { object in
            var files = object["files"] as? [String: Any] ?? [:]
            files["../outside.bin"] = ["sha256": String(repeating: "0", count: 64), "size": 1]
            object["files"] = files
        }
        let manifest = try Manifest.load(bundle: bundle)
        assertThrows(.unsafePath(key: "../outside.bin")) {
            try BundleVerifier(bundle: bundle, manifest: manifest).verify()
        }
    }

    func testCancellationStopsHashing() async throws {
        let fixtures = try Fixtures.load()
        let bundle = fixtures.url(fixtures.bundles[0].path)
        let manifest = try Manifest.load(bundle: bundle)
        let task = Task {
            try BundleVerifier(bundle: bundle, manifest: manifest, chunkSize: 1024).verify()
        }
        task.cancel()
        do {
            try await task.value
            XCTFail("a cancelled verification finished")
        } catch is CancellationError {
        }
    }
}
