package org.pocketllm.core

import org.json.JSONArray
import org.json.JSONObject
import java.io.File

/**
 * Texts of special tokens by id, from a Hugging Face tokenizer.json's `added_tokens`. The runner's onResult hands
 * out decoded text, the stop token included ("<|im_end|>"), so the app needs its text to cut it from the reply.
 * SentencePiece .model files are protobuf: none are read (the assistant suffix still gives the stop text).
 */
object SpecialTokens {
    fun texts(bundle: Bundle, ids: List<Long>): List<String> {
        val tok = bundle.manifest.tokenizer
        if (tok.kind != TokenizerKind.HUGGINGFACE) return emptyList()
        val byId = addedTokens(bundle.file(tok.file))
        return ids.mapNotNull { byId[it] }
    }

    fun addedTokens(tokenizerJson: File): Map<Long, String> {
        val root = try {
            JSONObject(tokenizerJson.readText(Charsets.UTF_8))
        } catch (e: Exception) {
            return emptyMap()
        }
        val added = root.opt("added_tokens") as? JSONArray ?: return emptyMap()
        val out = HashMap<Long, String>()
        for (i in 0 until added.length()) {
            val t = added.opt(i) as? JSONObject ?: continue
            val id = t.opt("id")
            val content = t.opt("content")
            if (id is Number && content is String) out[id.toLong()] = content
        }
        return out
    }
}
