package org.pocketllm.core

// The manifest.json model (schema_version 2), mirroring export/bundle/manifest.schema.json. Only what apps read is
// kept as fields; ManifestParser still validates every key the schema constrains.

const val SCHEMA_VERSION = 2

/** Patterns and enums copied from manifest.schema.json; SchemaMirrorTest checks they are the schema's. */
object ManifestSchema {
    const val SHA256 = "^[0-9a-f]{64}$"
    const val RELPATH = "^(?![/~])(?!.*//)(?!.*/$)(?!(.*/)?\\.\\.?(/|$))[^\\\\:\\u0000-\\u001f]+$"
    const val BUNDLE_NAME = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
    const val PLAIN_NAME = "^[^/\\\\\\u0000-\\u001f]+$"
    const val KERNEL = "^[a-z_][a-z0-9_]*::[a-z_][a-z0-9_]*(\\.[a-z_][a-z0-9_]*)?$"
    const val GENERATOR_VERSION = "^[0-9]+\\.[0-9]+\\.[0-9]+([.+-][0-9A-Za-z.+-]+)?$"
    const val MODEL_TYPE = "^[a-z0-9_]+$"
    const val METHOD = "^[A-Za-z_][A-Za-z0-9_]*$"
    const val SHAPE_SYMBOL = "^[A-Za-z_][A-Za-z0-9_]*$"
    const val DEPLOYMENT_TARGET = "^(iOS|macOS)[0-9]+$"

    val ARCHITECTURES = listOf("minicpm4", "smallthinker", "minimax")
    val WEIGHT_DTYPES = listOf("BF16", "F16", "F32")
    val TOKENIZER_KINDS = listOf("huggingface", "sentencepiece")
    val SCORE_RULES = listOf("upstream", "exact")  // InfLLM v2 block scores (docs/infllm_v2.md)
    val QUANT_SCHEMES = listOf("none", "any4", "int4", "nf4", "int8", "8da4w")
    val ATTENTION_KINDS = listOf("dense", "infllm", "sliding", "lightning")
    val DTYPES = listOf("int32", "int64", "float16", "bfloat16", "float32", "bool", "uint8", "int8")
    val COMPUTE_PRECISIONS = listOf("float16", "float32")
    val NUM_BOS = listOf(0L, 1L)
    val TARGETS = listOf("executorch", "coreml", "onnx")

    val sha256 = Regex(SHA256)
    val relpath = Regex(RELPATH)
    val bundleName = Regex(BUNDLE_NAME)
    val plainName = Regex(PLAIN_NAME)
    val kernel = Regex(KERNEL)
    val generatorVersion = Regex(GENERATOR_VERSION)
    val modelType = Regex(MODEL_TYPE)
    val method = Regex(METHOD)
    val shapeSymbol = Regex(SHAPE_SYMBOL)
    val deploymentTarget = Regex(DEPLOYMENT_TARGET)

    /** Strings that are absolute paths: a bundle never names the machine it was made on (schema.py ABSOLUTE_PATH). */
    val absolutePath = Regex("^(/|~/|[A-Za-z]:[\\\\/]|\\\\\\\\)")
}

data class FileEntry(val sha256: String, val size: Long)

enum class Role(val key: String) {
    SYSTEM("system"), USER("user"), ASSISTANT("assistant");

    companion object {
        fun of(key: String): Role? = values().firstOrNull { it.key == key }
    }
}

data class RoleFormat(val prefix: String, val suffix: String)

/** Chat formatting rendered from the checkpoint's Jinja template at export (export/bundle/chat.py). */
data class ChatFormat(val roles: Map<Role, RoleFormat>, val generationPrefix: String, val stopIds: List<Long>) {
    val supportsSystem: Boolean get() = roles.containsKey(Role.SYSTEM)
}

enum class TokenizerKind(val key: String) { HUGGINGFACE("huggingface"), SENTENCEPIECE("sentencepiece") }

data class TokenizerInfo(
    val files: List<String>,
    val kind: TokenizerKind,
    val file: String,
    val bosId: Long?,
    val eosIds: List<Long>,
    val numBos: Int,
    val chatTemplate: String?
)

data class ModelInfo(
    val vocabSize: Int,
    val hiddenSize: Int,
    val numLayers: Int,
    val numHeads: Int,
    val numKvHeads: Int,
    val headDim: Int,
    val maxContext: Int,
    val maxPositionEmbeddings: Int,
    val prefillChunk: Int
)

data class Source(val checkpoint: String, val weightDtype: String, val configSha256: String)

data class Quantization(val scheme: String, val groupSize: Int?, val bitsPerWeight: Double)

data class AttentionInfo(
    val perLayer: List<String>,
    val ropePerLayer: List<Boolean>,
    val slidingWindowPerLayer: List<Long?>,
    val hasInfllmV2: Boolean,
    val lightningLayers: List<Long>
)

data class IoTensor(val name: String, val dtype: String, val shape: List<String>)

data class ExecutorchTarget(
    val file: String,
    val formatVersion: Int,
    val methods: List<String>,
    val inputs: List<IoTensor>,
    val outputs: List<IoTensor>,
    val requiresKernels: List<String>,
    val prefillChunk: Int
)

/** Core ML and ONNX artifacts are for other apps; Android keeps their files and kernels for display. */
data class OtherTarget(val name: String, val file: String, val requiresKernels: List<String>)

data class Reference(val dir: String, val files: Map<String, FileEntry>)

data class Manifest(
    val name: String,
    val generatorVersion: String,
    val architecture: String,
    val modelType: String,
    val source: Source,
    val model: ModelInfo,
    val tokenizer: TokenizerInfo,
    val chat: ChatFormat?,
    val quantization: Quantization,
    val attention: AttentionInfo,
    val executorch: ExecutorchTarget?,
    val otherTargets: List<OtherTarget>,
    val files: Map<String, FileEntry>,
    val reference: Reference
) {
    val targetNames: List<String>
        get() = (if (executorch != null) listOf("executorch") else emptyList<String>()) + otherTargets.map { it.name }
}
