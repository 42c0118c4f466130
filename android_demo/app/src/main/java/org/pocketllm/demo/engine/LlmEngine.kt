package org.pocketllm.demo.engine

import org.pocketllm.core.GenerationSettings
import org.pocketllm.core.GenerationStats
import java.io.Closeable

/** A runtime failure with its ExecuTorch error code (runtime/core/error.h; -1 when not from the runtime). */
class EngineException(val code: Int, message: String, cause: Throwable? = null) : Exception(message, cause)

interface GenerationListener {
    /** A piece of generated text (one token, or more when the runtime held back incomplete UTF-8). */
    fun onPiece(text: String)

    fun onStats(stats: GenerationStats)
}

/**
 * What the app needs from a runtime. Every call but stop() blocks and must run on one dedicated thread; stop() may
 * be called from any thread (it takes effect at the next token). The runtime keeps its context (KV cache) between
 * generate() calls until resetContext().
 */
interface LlmEngine : Closeable {
    /** False when the runtime samples with a fixed top-p (ExecuTorch's LlmModule: 0.9). */
    val supportsTopP: Boolean

    fun load()

    fun generate(prompt: String, settings: GenerationSettings, listener: GenerationListener)

    fun stop()

    fun resetContext()
}
