package org.pocketllm.demo.engine

import org.pocketllm.core.Bundle
import org.pocketllm.core.GenerationSettings
import org.pocketllm.core.GenerationStats
import org.pytorch.executorch.ExecutorchRuntimeException
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import org.pytorch.executorch.extension.llm.LlmModuleConfig

/**
 * A bundle's .pte and tokenizer through ExecuTorch's LlmModule (org.pytorch:executorch-android 1.5.x, the same API
 * since 1.4): the runner reads the program's constant methods (BOS/EOS ids, max context, prefill chunk), prefills
 * the prompt in chunks, samples (temperature in [0, 1], top-p fixed at 0.9) and streams decoded text.
 *
 * BOS: LlmModule prepends `numBos` (the manifest's tokenizer.num_bos) to the first prompt after construction or
 * resetContext() only, which is what a chat continued in the same context needs.
 */
class ExecutorchEngine(private val bundle: Bundle) : LlmEngine {
    private val module: LlmModule
    private val maxContext = bundle.manifest.model.maxContext

    init {
        val config = LlmModuleConfig.create()
            .modulePath(bundle.pteFile.path)
            .tokenizerPath(bundle.tokenizerFile.path)
            .temperature(0f)  // default when a call passes a negative temperature; ours always pass one
            .numBos(bundle.manifest.tokenizer.numBos)
            .numEos(0)
            .loadMode(LlmModuleConfig.LOAD_MODE_MMAP)  // weights paged in from the file, not copied to the heap
            .build()
        module = try {
            LlmModule(config)
        } catch (e: ExecutorchRuntimeException) {
            throw EngineException(e.errorCode, e.message ?: "LlmModule could not be created", e)
        } catch (e: IllegalArgumentException) {  // a file missing or unreadable (ExecuTorchRuntime.validateFilePath)
            throw EngineException(-1, e.message ?: "LlmModule could not be created", e)
        }
    }

    override val supportsTopP: Boolean get() = false

    override fun load() {
        try {
            module.load()
        } catch (e: ExecutorchRuntimeException) {
            throw EngineException(e.errorCode, e.message ?: "model failed to load", e)
        }
    }

    override fun generate(prompt: String, settings: GenerationSettings, listener: GenerationListener) {
        var reported: Pair<Int, String>? = null
        val callback = object : LlmCallback {
            override fun onResult(result: String) = listener.onPiece(result)

            override fun onStats(stats: String) {
                try {
                    listener.onStats(GenerationStats.fromRunnerJson(stats))
                } catch (e: IllegalArgumentException) {
                    // statistics are informative only: a runtime that reports other fields must not break the chat
                }
            }

            override fun onError(errorCode: Int, message: String) {
                reported = errorCode to message
            }
        }
        try {
            // seqLen counts the whole context (earlier turns too): the model's own limit. Max new tokens is
            // enforced by the caller through stop(), since LlmModule.generate takes no such argument.
            module.generate(prompt, maxContext, callback, false, settings.temperature, 0, 0)
        } catch (e: ExecutorchRuntimeException) {
            val detail = reported?.second ?: e.message ?: "generate failed"
            throw EngineException(e.errorCode, detail, e)
        }
    }

    override fun stop() = module.stop()

    override fun resetContext() = module.resetContext()

    override fun close() = module.close()
}
