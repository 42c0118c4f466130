package org.pocketllm.core

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Test

/** ManifestSchema's patterns and enums are those of export/bundle/manifest.schema.json, character for character. */
class SchemaMirrorTest {
    private val schema = JSONObject(Fixtures.schemaFile.readText())
    private val defs = schema.getJSONObject("\$defs")
    private val props = schema.getJSONObject("properties")

    private fun pattern(def: String): String = defs.getJSONObject(def).getString("pattern")

    private fun enumAt(vararg path: String): List<Any> {
        var o = props
        for (p in path.dropLast(1)) o = o.getJSONObject(p).optJSONObject("properties") ?: o.getJSONObject(p)
        val e: JSONArray = o.getJSONObject(path.last()).getJSONArray("enum")
        return (0 until e.length()).map { e.get(it) }
    }

    @Test
    fun patternsMatchTheSchema() {
        assertEquals(pattern("sha256"), ManifestSchema.SHA256)
        assertEquals(pattern("relpath"), ManifestSchema.RELPATH)
        assertEquals(pattern("bundle_name"), ManifestSchema.BUNDLE_NAME)
        assertEquals(pattern("plain_name"), ManifestSchema.PLAIN_NAME)
        assertEquals(defs.getJSONObject("kernels").getJSONObject("items").getString("pattern"), ManifestSchema.KERNEL)
        assertEquals(props.getJSONObject("generator").getJSONObject("properties").getJSONObject("version")
            .getString("pattern"), ManifestSchema.GENERATOR_VERSION)
        assertEquals(props.getJSONObject("model_type").getString("pattern"), ManifestSchema.MODEL_TYPE)
        assertEquals(defs.getJSONObject("coreml_target").getJSONObject("properties")
            .getJSONObject("deployment_target").getString("pattern"), ManifestSchema.DEPLOYMENT_TARGET)
    }

    @Test
    fun enumsMatchTheSchema() {
        assertEquals(enumAt("architecture"), ManifestSchema.ARCHITECTURES)
        assertEquals(enumAt("source", "weight_dtype"), ManifestSchema.WEIGHT_DTYPES)
        assertEquals(enumAt("tokenizer", "kind"), ManifestSchema.TOKENIZER_KINDS)
        assertEquals(enumAt("quantization", "scheme"), ManifestSchema.QUANT_SCHEMES)
        assertEquals(enumAt("tokenizer", "num_bos").map { (it as Number).toLong() }, ManifestSchema.NUM_BOS)
        val kinds = props.getJSONObject("attention").getJSONObject("properties").getJSONObject("per_layer")
            .getJSONObject("items").getJSONArray("enum")
        assertEquals((0 until kinds.length()).map { kinds.getString(it) }, ManifestSchema.ATTENTION_KINDS)
        val dtypes = defs.getJSONObject("io_tensor").getJSONObject("properties").getJSONObject("dtype").getJSONArray("enum")
        assertEquals((0 until dtypes.length()).map { dtypes.getString(it) }, ManifestSchema.DTYPES)
        val targets = props.getJSONObject("targets").getJSONObject("properties")
        assertEquals(targets.keys().asSequence().toList(), ManifestSchema.TARGETS)
        val coreml = defs.getJSONObject("coreml_target").getJSONObject("properties")
        for (key in listOf("compute_precision", "float_weights")) {
            val e = coreml.getJSONObject(key).getJSONArray("enum")
            assertEquals((0 until e.length()).map { e.getString(it) }, ManifestSchema.COMPUTE_PRECISIONS)
        }
        assertEquals(schema.getJSONObject("properties").getJSONObject("schema_version").getInt("const"), SCHEMA_VERSION)
    }
}
