package org.pocketllm.core

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject

// Typed, path-tracking reads of parsed JSON (org.json: built into Android; Debian's libandroid-json-java on the JVM).
// Every failure is a ManifestException naming the key path ("tokenizer.eos_ids.1") the way
// export/bundle/schema.py does, so one broken manifest gets the same answer from Python and from the app.

/** One problem in a JSON document: where (a dotted key path) and what was expected. */
class ManifestException(val where: String, val problem: String) :
    Exception(if (where.length == 0) problem else "$where: $problem")

fun parseJsonObject(text: String, what: String): JsonObj {
    val value = try {
        JSONObject(text)
    } catch (e: JSONException) {
        throw ManifestException("", "$what is not valid JSON (${e.message})")
    }
    return JsonObj(value, "")
}

/** Renders a value the way the Python side's messages do (strings quoted, long values cut). */
internal fun shortValue(value: Any?): String {
    val text = when (value) {
        null, JSONObject.NULL -> "null"
        is String -> "'" + value + "'"
        is JSONObject -> "an object"
        is JSONArray -> "an array"
        else -> value.toString()
    }
    return if (text.length <= 60) text else text.substring(0, 57) + "..."
}

internal fun isIntegral(value: Any?): Boolean = when (value) {
    is Int, is Long, is Short, is Byte, is java.math.BigInteger -> true
    is Double -> !value.isInfinite() && !value.isNaN() && Math.floor(value) == value
    is Float -> !value.isInfinite() && !value.isNaN() && Math.floor(value.toDouble()) == value.toDouble()
    is java.math.BigDecimal -> value.signum() == 0 || value.stripTrailingZeros().scale() <= 0
    else -> false
}

internal fun typeName(value: Any?): String = when (value) {
    null, JSONObject.NULL -> "null"
    is String -> "string"
    is Boolean -> "boolean"
    is Number -> if (isIntegral(value)) "integer" else "number"
    is JSONObject -> "object"
    is JSONArray -> "array"
    else -> value.javaClass.simpleName
}

class JsonObj(val json: JSONObject, val path: String) {
    fun at(key: String): String = if (path.length == 0) key else "$path.$key"

    fun fail(key: String, problem: String): ManifestException = ManifestException(at(key), problem)

    fun has(key: String): Boolean = json.has(key)

    fun keys(): List<String> {
        val out = ArrayList<String>()
        val it = json.keys()
        while (it.hasNext()) out.add(it.next())
        return out
    }

    /** The schema's `required`: the first missing key, in the schema's order. */
    fun requireKeys(vararg keys: String) {
        for (k in keys) if (!json.has(k)) throw ManifestException(path.ifEmpty { "(top level)" }, "missing key '$k'")
    }

    /** The schema's `additionalProperties: false`. */
    fun closed(vararg allowed: String) {
        for (k in keys()) {
            if (k !in allowed) {
                throw ManifestException(path.ifEmpty { "(top level)" },
                    "unknown key '$k' (allowed: ${allowed.joinToString(", ")})")
            }
        }
    }

    fun raw(key: String): Any? = json.opt(key)

    fun isNull(key: String): Boolean = json.has(key) && json.opt(key) == JSONObject.NULL

    fun string(key: String): String {
        val v = json.opt(key)
        if (v !is String) throw fail(key, "expected string, got ${shortValue(v)}")
        return v
    }

    fun stringOrNull(key: String): String? = if (isNull(key)) null else string(key)

    fun bool(key: String): Boolean {
        val v = json.opt(key)
        if (v !is Boolean) throw fail(key, "expected boolean, got ${shortValue(v)}")
        return v
    }

    fun long(key: String, min: Long = Long.MIN_VALUE, max: Long = Long.MAX_VALUE): Long {
        val v = json.opt(key)
        if (v !is Number || !isIntegral(v)) throw fail(key, "expected integer, got ${shortValue(v)}")
        val n = v.toLong()
        if (n < min) throw fail(key, "$n is less than the minimum of $min")
        if (n > max) throw fail(key, "$n is greater than the maximum of $max")
        return n
    }

    fun int(key: String, min: Long = Int.MIN_VALUE.toLong()): Int = long(key, min, Int.MAX_VALUE.toLong()).toInt()

    fun longOrNull(key: String, min: Long = Long.MIN_VALUE): Long? = if (isNull(key)) null else long(key, min)

    fun number(key: String): Double {
        val v = json.opt(key)
        if (v !is Number) throw fail(key, "expected number, got ${shortValue(v)}")
        return v.toDouble()
    }

    fun obj(key: String): JsonObj {
        val v = json.opt(key)
        if (v !is JSONObject) throw fail(key, "expected object, got ${shortValue(v)}")
        return JsonObj(v, at(key))
    }

    fun objOrNull(key: String): JsonObj? = if (isNull(key)) null else obj(key)

    fun array(key: String): JsonArr {
        val v = json.opt(key)
        if (v !is JSONArray) throw fail(key, "expected array, got ${shortValue(v)}")
        return JsonArr(v, at(key))
    }

    /** A string matching `pattern` (the schema's `pattern`: a search, as JSON Schema validators do). */
    fun matching(key: String, pattern: Regex): String {
        val s = string(key)
        if (!pattern.containsMatchIn(s)) throw fail(key, "'$s' does not match ${pattern.pattern}")
        return s
    }

    fun oneOf(key: String, allowed: List<String>): String {
        val v = json.opt(key)
        if (v !is String || v !in allowed) {
            throw fail(key, "expected one of ${allowed.joinToString(", ")}, got ${shortValue(v)}")
        }
        return v
    }
}

class JsonArr(val json: JSONArray, val path: String) {
    val size: Int get() = json.length()

    fun at(i: Int): String = "$path.$i"

    fun fail(i: Int, problem: String): ManifestException = ManifestException(at(i), problem)

    fun raw(i: Int): Any? = json.opt(i)

    fun requireSize(min: Int) {
        if (size < min) throw ManifestException(path, "expected at least $min item(s), got $size")
    }

    fun string(i: Int): String {
        val v = json.opt(i)
        if (v !is String) throw fail(i, "expected string, got ${shortValue(v)}")
        return v
    }

    fun long(i: Int, min: Long = Long.MIN_VALUE): Long {
        val v = json.opt(i)
        if (v !is Number || !isIntegral(v)) throw fail(i, "expected integer, got ${shortValue(v)}")
        val n = v.toLong()
        if (n < min) throw fail(i, "$n is less than the minimum of $min")
        return n
    }

    fun bool(i: Int): Boolean {
        val v = json.opt(i)
        if (v !is Boolean) throw fail(i, "expected boolean, got ${shortValue(v)}")
        return v
    }

    fun obj(i: Int): JsonObj {
        val v = json.opt(i)
        if (v !is JSONObject) throw fail(i, "expected object, got ${shortValue(v)}")
        return JsonObj(v, at(i))
    }

    fun strings(): List<String> {
        val out = ArrayList<String>(size)
        for (i in 0 until size) out.add(string(i))
        return out
    }

    fun longs(min: Long = Long.MIN_VALUE): List<Long> {
        val out = ArrayList<Long>(size)
        for (i in 0 until size) out.add(long(i, min))
        return out
    }

    /** The schema's `uniqueItems`. */
    fun <T> unique(items: List<T>): List<T> {
        val seen = HashSet<T>()
        for ((i, item) in items.withIndex()) {
            if (!seen.add(item)) throw ManifestException(path, "has non-unique elements (item $i repeats ${shortValue(item)})")
        }
        return items
    }
}
