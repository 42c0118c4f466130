import Foundation
import XCTest

@testable import PocketLLMCore

/// Bundles written by the Python exporter in the same test run (tests/apps/test_ios_sources.py), found through
/// $POCKETLLM_IOS_FIXTURES. fixtures.json there lists each bundle with values Python read from its manifest, and chat
/// cases rendered by Python from the bundle's Jinja chat template.
struct Fixtures: Decodable {
    static let environmentKey = "POCKETLLM_IOS_FIXTURES"

    struct BundleFixture: Decodable {
        let path: String
        let target: String
        let name: String
        let vocabSize: Int
        let maxContext: Int
        let eosIDs: [Int]
        let requiresKernels: [String]
        let fileCount: Int

        enum CodingKeys: String, CodingKey {
            case path, target, name
            case vocabSize = "vocab_size"
            case maxContext = "max_context"
            case eosIDs = "eos_ids"
            case requiresKernels = "requires_kernels"
            case fileCount = "file_count"
        }
    }

    struct ChatCase: Decodable {
        let bundle: String
        let system: String
        let messages: [ChatMessage]
        let expected: String
    }

    let bundles: [BundleFixture]
    let chatCases: [ChatCase]

    enum CodingKeys: String, CodingKey {
        case bundles
        case chatCases = "chat_cases"
    }

    let root: URL

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        bundles = try c.decode([BundleFixture].self, forKey: .bundles)
        chatCases = try c.decode([ChatCase].self, forKey: .chatCases)
        root = URL(fileURLWithPath: "/")
    }

    private init(bundles: [BundleFixture], chatCases: [ChatCase], root: URL) {
        self.bundles = bundles
        self.chatCases = chatCases
        self.root = root
    }

    /// The fixtures, or XCTSkip when the tests run outside the Python harness.
    static func load() throws -> Fixtures {
        guard let directory = ProcessInfo.processInfo.environment[environmentKey], !directory.isEmpty else {
            throw XCTSkip("\(environmentKey) is not set: run through tests/apps/test_ios_sources.py, which exports "
                          + "the fixture bundles first")
        }
        let root = URL(fileURLWithPath: directory, isDirectory: true)
        let data = try Data(contentsOf: root.appendingPathComponent("fixtures.json"))
        let decoded = try JSONDecoder().decode(Fixtures.self, from: data)
        return Fixtures(bundles: decoded.bundles, chatCases: decoded.chatCases, root: root)
    }

    func url(_ relative: String) -> URL {
        root.appendingPathComponent(relative, isDirectory: true)
    }

    func bundles(target: String) throws -> [BundleFixture] {
        let found = bundles.filter { $0.target == target }
        if found.isEmpty { throw XCTSkip("no \(target) fixture bundle (the exporter has no \(target) target here)") }
        return found
    }
}

/// A writable copy of a fixture bundle, for tests that break it.
func copyOfBundle(_ source: URL) throws -> URL {
    let destination = FileManager.default.temporaryDirectory
        .appendingPathComponent("pocketllm-\(UUID().uuidString)", isDirectory: true)
        .appendingPathComponent(source.lastPathComponent, isDirectory: true)
    try FileManager.default.createDirectory(at: destination.deletingLastPathComponent(),
                                            withIntermediateDirectories: true)
    try FileManager.default.copyItem(at: source, to: destination)
    return destination
}

/// Rewrites a bundle's manifest.json through `edit` (a JSON object), as a test's deliberate corruption.
func editManifest(_ bundle: URL, _ edit: (inout [String: Any]) -> Void) throws {
    let url = bundle.appendingPathComponent(Manifest.fileName)
    guard var object = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any] else {
        throw XCTSkip("manifest.json is not a JSON object")
    }
    edit(&object)
    try JSONSerialization.data(withJSONObject: object).write(to: url)
}

func assertThrows(_ expected: PocketLLMError, file: StaticString = #filePath, line: UInt = #line,
                  _ body: () throws -> Void)
{
    do {
        try body()
        XCTFail("expected \(expected), nothing was thrown", file: file, line: line)
    } catch let error as PocketLLMError {
        XCTAssertEqual(error, expected, file: file, line: line)
    } catch {
        XCTFail("expected \(expected), got \(error)", file: file, line: line)
    }
}
