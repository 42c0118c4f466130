import Foundation
import PocketLLMCore
import Tokenizers

/// swift-transformers' tokenizer on the bundle's own tokenizer.json (+ tokenizer_config.json when the checkpoint
/// shipped one), read from disk: AutoTokenizer.from(modelFolder:) never touches the network.
public struct BundleTokenizer: TextTokenizer {
    private let tokenizer: any Tokenizer

    public static func load(bundle: URL, manifest: Manifest) async throws -> BundleTokenizer {
        let info = manifest.tokenizer
        let path = bundle.appendingPathComponent(info.file).path
        guard info.kind == "huggingface", info.file == "tokenizer.json" else {
            throw PocketLLMError.unsupported(
                what: "tokenizer.file \(info.file)",
                reason: "the Core ML engine reads Hugging Face tokenizer.json files (kind \(info.kind))")
        }
        do {
            // strict: false falls back to the BPE model for tokenizer classes swift-transformers does not name
            // (the tokenizer.json itself describes the model).
            let tokenizer = try await AutoTokenizer.from(modelFolder: bundle, strict: false)
            return BundleTokenizer(tokenizer: tokenizer)
        } catch {
            throw PocketLLMError.tokenizerFailed(path: path, reason: String(describing: error))
        }
    }

    public func encode(_ text: String) -> [Int] {
        tokenizer.encode(text: text, addSpecialTokens: false)
    }

    public func decode(_ tokens: [Int]) -> String {
        tokenizer.decode(tokens: tokens, skipSpecialTokens: true)
    }

    /// The text of one token with special tokens kept ("<|im_end|>"), to recognise stop tokens in text streams.
    public func pieceText(_ token: Int) -> String {
        tokenizer.decode(tokens: [token], skipSpecialTokens: false)
    }
}
