import Foundation
import XCTest

@testable import PocketLLMCore

/// FIPS 180-4 test vectors for both implementations, and chunked updates equal to one update.
final class SHA256Tests: XCTestCase {
    static let vectors: [(String, String)] = [
        ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        ("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
        ("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
         "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"),
    ]

    func testPortableMatchesTheStandardVectors() {
        for (message, digest) in Self.vectors {
            var hasher = PortableSHA256()
            hasher.update(data: Data(message.utf8))
            XCTAssertEqual(hexString(hasher.finalize()), digest, message)
        }
    }

    func testStreamingMatchesTheStandardVectors() {
        for (message, digest) in Self.vectors {
            XCTAssertEqual(StreamingSHA256.hex(of: Data(message.utf8)), digest, message)
        }
    }

    func testMillionAsInOddChunks() {
        // One million "a" fed in chunks that straddle the 64-byte blocks.
        let expected = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        var portable = PortableSHA256()
        var streaming = StreamingSHA256()
        var left = 1_000_000
        var size = 1
        while left > 0 {
            let chunk = Data(repeating: UInt8(ascii: "a"), count: min(size, left))
            portable.update(data: chunk)
            streaming.update(chunk)
            left -= chunk.count
            size = size * 3 % 1_000 + 1
        }
        XCTAssertEqual(hexString(portable.finalize()), expected)
        XCTAssertEqual(streaming.finalizeHex(), expected)
    }
}
