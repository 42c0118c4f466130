package org.pocketllm.core

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject

/**
 * The custom kernels the app's ExecuTorch runtime registers. The stock Maven AAR has none of pocketllm's; an AAR
 * built by android_demo/scripts/build_executorch_aar.sh carries `assets/pocketllm_kernels.json`:
 *
 *     {"format": 1, "executorch_version": "1.5.1", "abi": "arm64-v8a",
 *      "kernels": ["pocketllm::any4_linear.out", ...], "pocketllm_revision": "<git describe>"}
 */
class RuntimeKernels(val kernels: Set<String>, val description: String, val executorchVersion: String?) {
    companion object {
        const val ASSET = "pocketllm_kernels.json"

        fun stock(executorchVersion: String): RuntimeKernels =
            RuntimeKernels(emptySet(), "stock ExecuTorch $executorchVersion from Maven", executorchVersion)

        /** Parse the asset; IllegalArgumentException with one line on any problem. */
        fun parse(text: String): RuntimeKernels {
            val o = try {
                JSONObject(text)
            } catch (e: JSONException) {
                throw IllegalArgumentException("$ASSET is not valid JSON (${e.message})")
            }
            if (o.optInt("format", -1) != 1) throw IllegalArgumentException("$ASSET: unknown format ${o.opt("format")}")
            val arr = o.opt("kernels") as? JSONArray ?: throw IllegalArgumentException("$ASSET: 'kernels' is not an array")
            val names = LinkedHashSet<String>()
            for (i in 0 until arr.length()) {
                val k = arr.opt(i)
                if (k !is String || !ManifestSchema.kernel.containsMatchIn(k)) {
                    throw IllegalArgumentException("$ASSET: kernels.$i: ${shortValue(k)} is not an operator name")
                }
                names.add(k)
            }
            val version = o.optString("executorch_version", "").ifEmpty { null }
            val revision = o.optString("pocketllm_revision", "").ifEmpty { "unknown revision" }
            return RuntimeKernels(names, "custom ExecuTorch ${version ?: "?"} with pocketllm kernels ($revision)", version)
        }
    }
}

object KernelCheck {
    /** Operators the bundle's ExecuTorch program needs that the runtime lacks, in the manifest's order. */
    fun missing(bundle: Bundle, runtime: RuntimeKernels): List<String> =
        bundle.requireExecutorch().requiresKernels.filter { it !in runtime.kernels }

    fun require(bundle: Bundle, runtime: RuntimeKernels) {
        val missing = missing(bundle, runtime)
        if (missing.isNotEmpty()) throw BundleProblem.MissingKernels(missing, runtime.description)
    }
}
