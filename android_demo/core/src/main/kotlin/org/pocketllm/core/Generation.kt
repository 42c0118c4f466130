package org.pocketllm.core

import org.json.JSONException
import org.json.JSONObject

/**
 * What the user sets. ExecuTorch's text runner accepts temperatures in [0, 1] (0 = greedy) and samples with a fixed
 * top-p of 0.9 (extension/llm/sampler kTopp); `topP` is kept for runtimes that take it (LlmEngine.supportsTopP).
 */
data class GenerationSettings(
    val temperature: Float = 0.6f,
    val topP: Float = 0.9f,
    val maxNewTokens: Int = 512,
    val systemPrompt: String = "",
    val useChatTemplate: Boolean = true
) {
    /** Problems, one line each (empty = valid) for a model whose context holds `maxContext` tokens. */
    fun problems(maxContext: Int): List<String> {
        val out = ArrayList<String>()
        if (temperature.isNaN() || temperature < 0f || temperature > 1f) {
            out.add("temperature must be in [0, 1] (ExecuTorch's sampler), got $temperature")
        }
        if (topP.isNaN() || topP <= 0f || topP > 1f) out.add("top-p must be in (0, 1], got $topP")
        if (maxNewTokens < 1 || maxNewTokens >= maxContext) {
            out.add("max new tokens must be in [1, ${maxContext - 1}] (context $maxContext), got $maxNewTokens")
        }
        return out
    }

    /** The nearest valid settings (what a slider would produce). */
    fun clamped(maxContext: Int): GenerationSettings = copy(
        temperature = if (temperature.isNaN()) 0f else Math.max(0f, Math.min(1f, temperature)),
        topP = if (topP.isNaN() || topP <= 0f) 0.9f else Math.min(1f, topP),
        maxNewTokens = Math.max(1, Math.min(maxContext - 1, maxNewTokens)))
}

/**
 * One generate() call's statistics, from the JSON ExecuTorch's runner hands LlmCallback.onStats
 * (extension/llm/runner/stats.h stats_to_json_string; times in ms since an arbitrary origin). Rates are computed as
 * the runner logs them: prefill = prompt tokens / (prompt_eval_end - inference_start), decode = generated tokens /
 * (inference_end - prompt_eval_end).
 */
data class GenerationStats(
    val promptTokens: Long,
    val generatedTokens: Long,
    val prefillMs: Long,
    val decodeMs: Long,
    val firstTokenMs: Long,
    val modelLoadMs: Long
) {
    val prefillTokensPerSecond: Double? get() = rate(promptTokens, prefillMs)
    val decodeTokensPerSecond: Double? get() = rate(generatedTokens, decodeMs)

    private fun rate(tokens: Long, ms: Long): Double? = if (ms > 0) tokens * 1000.0 / ms else null

    /** "prefill 143.2 tok/s · decode 27.9 tok/s" (a dash where a phase took no measurable time). */
    fun summary(): String = "prefill ${fmt(prefillTokensPerSecond)} tok/s · decode ${fmt(decodeTokensPerSecond)} tok/s"

    companion object {
        private fun fmt(v: Double?): String = if (v == null) "–" else String.format(java.util.Locale.ROOT, "%.1f", v)

        fun fromRunnerJson(text: String): GenerationStats {
            val o = try {
                JSONObject(text)
            } catch (e: JSONException) {
                throw IllegalArgumentException("runner stats are not JSON: ${e.message}")
            }
            fun ms(key: String): Long {
                if (!o.has(key)) throw IllegalArgumentException("runner stats lack '$key'")
                return o.getLong(key)
            }
            val start = ms("inference_start_ms")
            val promptEnd = ms("prompt_eval_end_ms")
            val end = ms("inference_end_ms")
            val loadStart = if (o.has("model_load_start_ms")) o.getLong("model_load_start_ms") else 0L
            val loadEnd = if (o.has("model_load_end_ms")) o.getLong("model_load_end_ms") else 0L
            val first = if (o.has("first_token_ms")) o.getLong("first_token_ms") - start else promptEnd - start
            return GenerationStats(ms("prompt_tokens"), ms("generated_tokens"), promptEnd - start, end - promptEnd,
                first, Math.max(0L, loadEnd - loadStart))
        }
    }
}

/**
 * Counts streamed pieces against the max-new-tokens setting. LlmModule has no max-new-tokens argument (its
 * seqLen counts the whole context, including earlier turns), so the app calls stop() once the budget is used.
 * Each onResult piece is one token, or several when the runner held back an incomplete UTF-8 sequence.
 */
class TokenBudget(private val maxNewTokens: Int) {
    var used: Int = 0
        private set

    /** Count one piece; true when generation should stop now. */
    fun onPiece(): Boolean {
        used++
        return used >= maxNewTokens
    }
}

/** What an ExecuTorch error code (runtime/core/error.h) means for the user. */
enum class RuntimeFailure(val title: String, val advice: String) {
    OUT_OF_MEMORY("Out of memory",
        "the model does not fit in this device's free memory; close other apps or use a smaller / more quantized bundle"),
    MISSING_OPERATOR("Missing operator",
        "the program calls an operator this runtime lacks; build the runtime with $KERNEL_BUILD_SCRIPT"),
    INVALID_PROGRAM("Model failed to load",
        "the .pte program is invalid for this runtime; export it with the ExecuTorch version the app uses"),
    CONTEXT_FULL("Context full",
        "the conversation no longer fits the model's context; start a new chat"),
    OTHER("Model failed", "see the details below");

    companion object {
        // Error codes of executorch/runtime/core/error.h (ExecutorchRuntimeException.errorCode)
        const val CODE_INVALID_ARGUMENT = 0x12
        const val CODE_OPERATOR_MISSING = 0x14
        const val CODE_NOT_FOUND = 0x20
        const val CODE_MEMORY_ALLOCATION_FAILED = 0x21
        const val CODE_INVALID_PROGRAM = 0x23
        const val CODE_OUT_OF_RESOURCES = 0x25
        const val CODE_DELEGATE_MEMORY_ALLOCATION_FAILED = 0x31

        /** During load(): the program's failures. During generate(): invalid argument = the prompt does not fit. */
        fun classify(code: Int, duringGenerate: Boolean): RuntimeFailure = when (code) {
            CODE_MEMORY_ALLOCATION_FAILED, CODE_OUT_OF_RESOURCES, CODE_DELEGATE_MEMORY_ALLOCATION_FAILED -> OUT_OF_MEMORY
            CODE_OPERATOR_MISSING -> MISSING_OPERATOR
            CODE_INVALID_PROGRAM, CODE_NOT_FOUND -> if (duringGenerate) OTHER else INVALID_PROGRAM
            CODE_INVALID_ARGUMENT -> if (duringGenerate) CONTEXT_FULL else INVALID_PROGRAM
            else -> OTHER
        }
    }
}

/**
 * Rough memory need of a bundle on the phone: the program file (weights are mmapped but touched every token) plus
 * the KV cache. Used to warn before loading a bundle that cannot fit.
 */
object MemoryEstimate {
    fun bytes(bundle: Bundle): Long {
        val m = bundle.manifest.model
        val pte = bundle.manifest.executorch?.let { bundle.manifest.files[it.file]?.size } ?: 0L
        val kvCache = 2L * m.numLayers * m.maxContext * m.numKvHeads * m.headDim * 4L  // fp32 K and V
        return pte + kvCache
    }
}
