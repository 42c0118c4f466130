package org.pocketllm.core

import org.json.JSONArray
import org.json.JSONObject

/**
 * manifest.json text -> Manifest, enforcing export/bundle/manifest.schema.json (required keys, types, enums,
 * patterns, closed objects) and the cross-key rules of export/bundle/schema.py. The first problem is thrown as
 * BundleProblem.UnknownSchemaVersion or BundleProblem.InvalidManifest (key path + what was expected).
 */
object ManifestParser {
    fun parse(text: String): Manifest {
        val root = try {
            parseJsonObject(text, "manifest.json")
        } catch (e: ManifestException) {
            throw BundleProblem.InvalidManifest(e.where, e.problem)
        }
        val version = root.raw("schema_version")
        if (!(version is Number && isIntegral(version) && version.toLong() == SCHEMA_VERSION.toLong())) {
            throw BundleProblem.UnknownSchemaVersion(version)
        }
        return try {
            val m = readManifest(root)
            checkAcrossKeys(root, m)
            m
        } catch (e: ManifestException) {
            throw BundleProblem.InvalidManifest(e.where, e.problem)
        }
    }

    private fun readManifest(root: JsonObj): Manifest {
        root.requireKeys("schema_version", "generator", "name", "architecture", "model_type", "source", "model",
            "tokenizer", "chat", "quantization", "attention", "targets", "files", "reference", "spec", "export")
        root.closed("schema_version", "generator", "name", "architecture", "model_type", "source", "model",
            "tokenizer", "chat", "quantization", "attention", "targets", "files", "reference", "spec", "export",
            "parity")

        val gen = root.obj("generator")
        gen.requireKeys("name", "version")
        gen.closed("name", "version")
        if (gen.raw("name") != "pocketllm") throw gen.fail("name", "expected 'pocketllm', got ${shortValue(gen.raw("name"))}")
        val generatorVersion = gen.matching("version", ManifestSchema.generatorVersion)

        val name = root.matching("name", ManifestSchema.bundleName)
        val architecture = root.oneOf("architecture", ManifestSchema.ARCHITECTURES)
        val modelType = root.matching("model_type", ManifestSchema.modelType)
        val source = readSource(root.obj("source"))
        val model = readModel(root.obj("model"))
        val tokenizer = readTokenizer(root.obj("tokenizer"))
        val chat = root.objOrNull("chat")?.let { readChat(it) }
        if (!root.isNull("chat")) root.obj("chat") // non-null, non-object values fail here
        val quantization = readQuantization(root.obj("quantization"))
        val attention = readAttention(root.obj("attention"))

        val targets = root.obj("targets")
        if (targets.keys().isEmpty()) throw ManifestException(targets.path, "should be non-empty (at least one target)")
        targets.closed(*ManifestSchema.TARGETS.toTypedArray())
        val executorch = if (targets.has("executorch")) readExecutorch(targets.obj("executorch")) else null
        val others = ArrayList<OtherTarget>()
        if (targets.has("coreml")) others.add(readCoreml(targets.obj("coreml")))
        if (targets.has("onnx")) others.add(readOnnx(targets.obj("onnx")))

        val files = readFileTable(root.obj("files"))
        if (files.isEmpty()) throw ManifestException("files", "should be non-empty")
        val refObj = root.obj("reference")
        refObj.requireKeys("dir", "files")
        refObj.closed("dir", "files")
        val reference = Reference(refObj.matching("dir", ManifestSchema.relpath), readFileTable(refObj.obj("files")))

        val spec = root.obj("spec")
        spec.requireKeys("family", "vocab_size", "num_layers", "layers")
        val export = root.obj("export")
        export.requireKeys("timings", "peak_rss_mib")
        val timings = export.obj("timings")
        for (k in timings.keys()) if (timings.number(k) < 0) throw timings.fail(k, "${timings.number(k)} is less than the minimum of 0")
        if (export.number("peak_rss_mib") < 0) throw export.fail("peak_rss_mib", "is less than the minimum of 0")
        if (root.has("parity")) root.obj("parity")

        return Manifest(name, generatorVersion, architecture, modelType, source, model, tokenizer, chat, quantization,
            attention, executorch, others, files, reference)
    }

    private fun readSource(o: JsonObj): Source {
        o.requireKeys("checkpoint", "weight_dtype", "config_sha256")
        for (k in o.keys()) {
            val v = o.raw(k)
            if (v is JSONObject || v is JSONArray) throw o.fail(k, "expected ['string', 'number', 'boolean', 'null'], got ${shortValue(v)}")
        }
        return Source(o.matching("checkpoint", ManifestSchema.plainName),
            o.oneOf("weight_dtype", ManifestSchema.WEIGHT_DTYPES),
            o.matching("config_sha256", ManifestSchema.sha256))
    }

    private fun readModel(o: JsonObj): ModelInfo {
        val keys = arrayOf("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "max_context", "max_position_embeddings", "prefill_chunk")
        o.requireKeys(*keys)
        o.closed(*keys)
        return ModelInfo(o.int("vocab_size", 1), o.int("hidden_size", 1), o.int("num_layers", 1),
            o.int("num_heads", 1), o.int("num_kv_heads", 1), o.int("head_dim", 1), o.int("max_context", 1),
            o.int("max_position_embeddings", 1), o.int("prefill_chunk", 1))
    }

    private fun readTokenizer(o: JsonObj): TokenizerInfo {
        val keys = arrayOf("files", "kind", "file", "bos_id", "eos_ids", "num_bos", "chat_template")
        o.requireKeys(*keys)
        o.closed(*keys)
        val filesArr = o.array("files")
        filesArr.requireSize(1)
        val files = filesArr.unique(relpaths(filesArr))
        val kindKey = o.oneOf("kind", ManifestSchema.TOKENIZER_KINDS)
        val kind = TokenizerKind.values().first { it.key == kindKey }
        val file = o.matching("file", ManifestSchema.relpath)
        val bosId = o.longOrNull("bos_id", 0)
        val eosArr = o.array("eos_ids")
        eosArr.requireSize(1)
        val eosIds = eosArr.unique(eosArr.longs(0))
        val numBos = o.long("num_bos")
        if (numBos !in ManifestSchema.NUM_BOS) throw o.fail("num_bos", "expected one of 0, 1, got $numBos")
        val template = o.stringOrNull("chat_template")
        return TokenizerInfo(files, kind, file, bosId, eosIds, numBos.toInt(), template)
    }

    private fun readChat(o: JsonObj): ChatFormat {
        o.requireKeys("roles", "generation_prefix", "stop_ids")
        o.closed("roles", "generation_prefix", "stop_ids")
        val rolesObj = o.obj("roles")
        rolesObj.requireKeys("user", "assistant")
        rolesObj.closed("system", "user", "assistant")
        val roles = LinkedHashMap<Role, RoleFormat>()
        for (role in Role.values()) {
            if (!rolesObj.has(role.key)) continue
            val r = rolesObj.obj(role.key)
            r.requireKeys("prefix", "suffix")
            r.closed("prefix", "suffix")
            roles[role] = RoleFormat(r.string("prefix"), r.string("suffix"))
        }
        val stops = o.array("stop_ids")
        return ChatFormat(roles, o.string("generation_prefix"), stops.unique(stops.longs(0)))
    }

    private fun readQuantization(o: JsonObj): Quantization {
        o.requireKeys("scheme", "bits_per_weight")
        val scheme = o.oneOf("scheme", ManifestSchema.QUANT_SCHEMES)
        val group = if (o.has("group_size") && !o.isNull("group_size")) o.int("group_size", 1) else null
        val bits = o.number("bits_per_weight")
        if (bits <= 0) throw o.fail("bits_per_weight", "$bits is less than or equal to the minimum of 0")
        if (bits > 32) throw o.fail("bits_per_weight", "$bits is greater than the maximum of 32")
        return Quantization(scheme, group, bits)
    }

    private fun readAttention(o: JsonObj): AttentionInfo {
        o.requireKeys("per_layer", "rope_per_layer", "sliding_window_per_layer")
        o.closed("per_layer", "rope_per_layer", "sliding_window_per_layer", "infllm_v2", "lightning")
        val kindsArr = o.array("per_layer")
        kindsArr.requireSize(1)
        val kinds = ArrayList<String>()
        for (i in 0 until kindsArr.size) {
            val k = kindsArr.raw(i)
            if (k !is String || k !in ManifestSchema.ATTENTION_KINDS) {
                throw kindsArr.fail(i, "expected one of ${ManifestSchema.ATTENTION_KINDS.joinToString(", ")}, got ${shortValue(k)}")
            }
            kinds.add(k)
        }
        val ropeArr = o.array("rope_per_layer")
        ropeArr.requireSize(1)
        val rope = ArrayList<Boolean>()
        for (i in 0 until ropeArr.size) rope.add(ropeArr.bool(i))
        val swArr = o.array("sliding_window_per_layer")
        swArr.requireSize(1)
        val windows = ArrayList<Long?>()
        for (i in 0 until swArr.size) windows.add(if (swArr.raw(i) == JSONObject.NULL) null else swArr.long(i, 1))
        if (o.has("infllm_v2")) {
            val s = o.obj("infllm_v2")
            val keys = arrayOf("kernel_size", "kernel_stride", "init_blocks", "block_size", "window_size", "topk",
                "use_nope", "dense_len", "score_rule")
            s.requireKeys(*keys)
            s.closed(*keys)
            s.long("kernel_size", 1); s.long("kernel_stride", 1); s.long("init_blocks", 0); s.long("block_size", 1)
            s.long("window_size", 0); s.long("topk", 1); s.bool("use_nope"); s.long("dense_len", -1)
            s.oneOf("score_rule", ManifestSchema.SCORE_RULES)
        }
        var lightning: List<Long> = emptyList()
        if (o.has("lightning")) {
            val l = o.obj("lightning")
            l.requireKeys("layers", "block_size")
            val layers = l.array("layers")
            layers.requireSize(1)
            lightning = layers.unique(layers.longs(0))
            l.long("block_size", 1)
        }
        return AttentionInfo(kinds, rope, windows, o.has("infllm_v2"), lightning)
    }

    private fun relpaths(a: JsonArr): List<String> {
        val out = ArrayList<String>(a.size)
        for (i in 0 until a.size) {
            val s = a.string(i)
            if (!ManifestSchema.relpath.containsMatchIn(s)) throw a.fail(i, "'$s' does not match ${ManifestSchema.RELPATH}")
            out.add(s)
        }
        return out
    }

    private fun readKernels(o: JsonObj): List<String> {
        val a = o.array("requires_kernels")
        val out = ArrayList<String>(a.size)
        for (i in 0 until a.size) {
            val s = a.string(i)
            if (!ManifestSchema.kernel.containsMatchIn(s)) throw a.fail(i, "'$s' does not match ${ManifestSchema.KERNEL}")
            out.add(s)
        }
        return a.unique(out)
    }

    private fun readTensors(o: JsonObj, key: String, needRole: Boolean): List<IoTensor> {
        val a = o.array(key)
        a.requireSize(1)
        val out = ArrayList<IoTensor>(a.size)
        for (i in 0 until a.size) out.add(readTensor(a.obj(i), needRole))
        return out
    }

    private fun readTensor(t: JsonObj, needRole: Boolean): IoTensor {
        if (needRole) t.requireKeys("name", "role", "dtype", "shape") else t.requireKeys("name", "dtype", "shape")
        val name = t.string("name")
        if (name.length == 0) throw t.fail("name", "'' is too short")
        if (t.has("role")) t.string("role")
        val dtype = t.oneOf("dtype", ManifestSchema.DTYPES)
        val shapeArr = t.array("shape")
        val shape = ArrayList<String>(shapeArr.size)
        for (i in 0 until shapeArr.size) {
            val d = shapeArr.raw(i)
            when {
                d is Number && isIntegral(d) && d.toLong() >= 0 -> shape.add(d.toLong().toString())
                d is String && ManifestSchema.shapeSymbol.containsMatchIn(d) -> shape.add(d)
                else -> throw shapeArr.fail(i, "expected a size (integer >= 0) or a symbol, got ${shortValue(d)}")
            }
        }
        return IoTensor(name, dtype, shape)
    }

    private fun readExecutorch(o: JsonObj): ExecutorchTarget {
        o.requireKeys("file", "format_version", "methods", "inputs", "outputs", "requires_kernels", "prefill_chunk")
        val file = o.matching("file", ManifestSchema.relpath)
        if (!file.endsWith(".pte")) throw o.fail("file", "'$file' does not match \\.pte$")
        val methodsArr = o.array("methods")
        methodsArr.requireSize(1)
        val methods = methodsArr.unique(methodsArr.strings())
        for ((i, m) in methods.withIndex()) {
            if (!ManifestSchema.method.containsMatchIn(m)) throw methodsArr.fail(i, "'$m' does not match ${ManifestSchema.METHOD}")
        }
        if ("forward" !in methods) throw ManifestException(methodsArr.path, "does not contain 'forward'")
        return ExecutorchTarget(file, o.int("format_version", 1), methods, readTensors(o, "inputs", false),
            readTensors(o, "outputs", false), readKernels(o), o.int("prefill_chunk", 1))
    }

    private fun readCoreml(o: JsonObj): OtherTarget {
        o.requireKeys("file", "deployment_target", "compute_precision", "functions", "states", "prefill_chunk",
            "requires_kernels")
        val file = o.matching("file", ManifestSchema.relpath)
        if (!file.endsWith(".mlpackage")) throw o.fail("file", "'$file' does not match \\.mlpackage$")
        o.matching("deployment_target", ManifestSchema.deploymentTarget)
        o.oneOf("compute_precision", ManifestSchema.COMPUTE_PRECISIONS)
        val functions = o.obj("functions")
        functions.requireKeys("prefill", "decode")
        for (f in listOf("prefill", "decode")) {
            val fn = functions.obj(f)
            fn.requireKeys("name", "inputs", "outputs")
            if (fn.string("name").length == 0) throw fn.fail("name", "'' is too short")
            readTensors(fn, "inputs", true)
            readTensors(fn, "outputs", true)
        }
        val states = o.array("states")
        for (i in 0 until states.size) readTensor(states.obj(i), false)
        o.int("prefill_chunk", 1)
        if (o.has("pad_token_id")) o.int("pad_token_id", -1)
        if (o.has("pads_prefill")) o.bool("pads_prefill")
        if (o.has("rewinds")) o.bool("rewinds")
        if (o.has("float_weights")) o.oneOf("float_weights", ManifestSchema.COMPUTE_PRECISIONS)
        return OtherTarget("coreml", file, readKernels(o))
    }

    private fun readOnnx(o: JsonObj): OtherTarget {
        o.requireKeys("dir", "file", "genai_config", "inputs", "outputs", "requires_kernels")
        o.matching("dir", ManifestSchema.relpath)
        val file = o.matching("file", ManifestSchema.relpath)
        if (!file.endsWith(".onnx")) throw o.fail("file", "'$file' does not match \\.onnx$")
        o.matching("genai_config", ManifestSchema.relpath)
        readTensors(o, "inputs", false)
        readTensors(o, "outputs", false)
        return OtherTarget("onnx", file, readKernels(o))
    }

    private fun readFileTable(o: JsonObj): Map<String, FileEntry> {
        val out = LinkedHashMap<String, FileEntry>()
        for (name in o.keys()) {
            if (!ManifestSchema.relpath.containsMatchIn(name)) {
                throw ManifestException(o.path, "key '$name' does not match ${ManifestSchema.RELPATH}")
            }
            val e = o.obj(name)
            e.requireKeys("sha256", "size")
            e.closed("sha256", "size")
            out[name] = FileEntry(e.matching("sha256", ManifestSchema.sha256), e.long("size", 0))
        }
        return out
    }

    /** export/bundle/schema.py semantic_errors, in the same order. */
    private fun checkAcrossKeys(root: JsonObj, m: Manifest) {
        val tok = m.tokenizer
        if (tok.file !in tok.files) {
            throw ManifestException("tokenizer.file", "'${tok.file}' is not one of tokenizer.files (${tok.files.joinToString(", ")})")
        }
        for (name in tok.files) {
            if (name !in m.files) throw ManifestException("tokenizer.files", "'$name' is not listed in files")
        }
        val targetFiles = ArrayList<Pair<String, String>>()
        val targets = root.obj("targets")
        for (t in targets.keys()) targetFiles.add(t to targets.obj(t).string("file"))
        for ((t, file) in targetFiles) {  // a file, or a directory (.mlpackage) with files listed under it
            if (file !in m.files && m.files.keys.none { it.startsWith("$file/") }) {
                throw ManifestException("targets.$t.file", "'$file' is not listed in files")
            }
        }
        val chat = m.chat
        if (chat != null) {
            for (id in chat.stopIds) {
                if (id !in tok.eosIds) throw ManifestException("chat.stop_ids", "$id is not one of tokenizer.eos_ids ${tok.eosIds}")
            }
        }
        for (name in m.reference.files.keys) {
            if (!name.startsWith(m.reference.dir + "/")) {
                throw ManifestException("reference.files", "'$name' is not inside reference.dir '${m.reference.dir}'")
            }
        }
        val n = m.model.numLayers
        val lengths = listOf("per_layer" to m.attention.perLayer.size, "rope_per_layer" to m.attention.ropePerLayer.size,
            "sliding_window_per_layer" to m.attention.slidingWindowPerLayer.size)
        for ((key, len) in lengths) {
            if (len != n) throw ManifestException("attention.$key", "$len entries for model.num_layers $n")
        }
        checkNoAbsolutePaths(root.json, "")
    }

    private val freeText = listOf("tokenizer.chat_template", "chat", "parity")

    private fun checkNoAbsolutePaths(value: Any?, path: String) {
        if (freeText.any { path == it || path.startsWith("$it.") }) return
        when (value) {
            is String -> if (ManifestSchema.absolutePath.containsMatchIn(value)) {
                throw ManifestException(path.ifEmpty { "(top level)" },
                    "${shortValue(value)} is an absolute path (bundles are relocatable: names, not paths)")
            }
            is JSONObject -> {
                val it = value.keys()
                while (it.hasNext()) {
                    val k = it.next()
                    val p = if (path.length == 0) k else "$path.$k"
                    checkNoAbsolutePaths(k, p)
                    checkNoAbsolutePaths(value.opt(k), p)
                }
            }
            is JSONArray -> for (i in 0 until value.length()) checkNoAbsolutePaths(value.opt(i), "$path.$i")
        }
    }
}
