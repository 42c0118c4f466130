import Foundation

/// A bundle's tokenizer as the generator needs it. Engines adapt swift-transformers' Tokenizers to this.
public protocol TextTokenizer: Sendable {
    /// Token ids of `text` without special tokens (BOS is added from the manifest, see `promptTokens`).
    func encode(_ text: String) -> [Int]
    /// Text of `tokens`, special tokens skipped.
    func decode(_ tokens: [Int]) -> String
}

extension TextTokenizer {
    /// BOS (manifest tokenizer.bos_id, num_bos times) followed by the encoded prompt: the same ids ExecuTorch's runner
    /// feeds (GenerationConfig.num_bos) and pocketllm's own runtime uses.
    public func promptTokens(_ text: String, tokenizer info: Manifest.TokenizerInfo) -> [Int] {
        let bos = info.bosID.map { Array(repeating: $0, count: max(0, info.numBOS)) } ?? []
        return bos + encode(text)
    }
}

/// Turns the growing list of generated ids into the reply text. Each step decodes the whole reply again (cheap for
/// chat-length replies) so byte-level BPE pieces and SentencePiece's leading-space rule come out as the tokenizer
/// decodes the full sequence; a reply that ends inside a multi-byte character (U+FFFD at the end) is held back until
/// the character is complete.
public struct StreamingDetokenizer: Sendable {
    public private(set) var tokens: [Int] = []
    public private(set) var text = ""

    public init() {}

    /// Adds `token`; returns the reply text when it changed, nil while a character is incomplete.
    public mutating func append(_ token: Int, decode: ([Int]) -> String) -> String? {
        tokens.append(token)
        let full = decode(tokens)
        if full.hasSuffix("\u{FFFD}") { return nil }
        if full == text { return nil }
        text = full
        return full
    }
}
