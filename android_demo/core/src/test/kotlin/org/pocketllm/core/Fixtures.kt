package org.pocketllm.core

import org.json.JSONArray
import org.json.JSONObject
import java.io.File

/**
 * What the Python side of the test run prepared (tests/apps/conftest.py), read from the JSON file named by the
 * system property `pocketllm.fixtures`: bundles written by `pocketllm export` (or the contract's example bundle),
 * broken manifests with the text both validators must report, conversations with their Jinja renderings, and the
 * kernel list the build script recorded for the host-built kernel library.
 */
object Fixtures {
    class BundleCase(val dir: File, val name: String, val requiresKernels: List<String>, val eosIds: List<Long>,
                     val maxContext: Int, val files: List<String>)

    class Mutation(val name: String, val expect: String, val manifest: String)

    class Conversation(val messages: List<ChatMessage>, val expected: String)

    class ChatCase(val name: String, val manifest: String, val conversations: List<Conversation>)

    private val root: JSONObject by lazy {
        val path = System.getProperty("pocketllm.fixtures")
            ?: throw IllegalStateException("run with -Dpocketllm.fixtures=<fixtures.json> (tests/apps writes it)")
        JSONObject(File(path).readText(Charsets.UTF_8))
    }

    val schemaFile: File get() = File(root.getString("schema_path"))

    val workDir: File get() = File(root.getString("work_dir"))

    val bundles: List<BundleCase> by lazy {
        objects(root.getJSONArray("bundles")).map { o ->
            BundleCase(File(o.getString("dir")), o.getString("name"), strings(o.getJSONArray("requires_kernels")),
                longs(o.getJSONArray("eos_ids")), o.getInt("max_context"), strings(o.getJSONArray("files")))
        }
    }

    val mutations: List<Mutation> by lazy {
        objects(root.getJSONArray("mutations")).map { Mutation(it.getString("name"), it.getString("expect"), it.getString("manifest")) }
    }

    val chats: List<ChatCase> by lazy {
        objects(root.getJSONArray("chats")).map { c ->
            val convs = objects(c.getJSONArray("conversations")).map { conv ->
                val msgs = objects(conv.getJSONArray("messages")).map {
                    ChatMessage(Role.of(it.getString("role")) ?: throw IllegalArgumentException(it.toString()),
                        it.getString("content"))
                }
                Conversation(msgs, conv.getString("expected"))
            }
            ChatCase(c.getString("name"), c.getString("manifest"), convs)
        }
    }

    /** pocketllm_kernels.json as build_executorch_aar.sh writes it, for the host-built kernel library (or null). */
    val kernelsJson: File? get() = if (root.isNull("kernels_json")) null else File(root.getString("kernels_json"))

    val hostKernels: List<String> get() = strings(root.getJSONArray("host_kernels"))

    private var counter = 0

    /** A new empty directory under the work dir. */
    fun scratch(label: String): File {
        counter++
        val d = File(workDir, "$label-${System.nanoTime()}-$counter")
        if (!d.mkdirs()) throw IllegalStateException("cannot create $d")
        return d
    }

    /** A private copy of a bundle directory that a test may break. */
    fun copyBundle(case: BundleCase): File {
        val dst = File(scratch("copy"), case.dir.name)
        case.dir.copyRecursively(dst)
        return dst
    }

    private fun objects(a: JSONArray): List<JSONObject> = (0 until a.length()).map { a.getJSONObject(it) }
    private fun strings(a: JSONArray): List<String> = (0 until a.length()).map { a.getString(it) }
    private fun longs(a: JSONArray): List<Long> = (0 until a.length()).map { a.getLong(it) }
}
