package org.pocketllm.core

import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File

class ManifestTest {
    @Test
    fun everyBundleLoadsWithWhatTheExporterWrote() {
        assertTrue("no bundles in the fixtures", Fixtures.bundles.isNotEmpty())
        for (case in Fixtures.bundles) {
            val b = Bundle.open(case.dir)
            val m = b.manifest
            assertEquals(case.name, m.name)
            assertEquals(case.name, case.requiresKernels, b.requireExecutorch().requiresKernels)
            assertEquals(case.name, case.eosIds, m.tokenizer.eosIds)
            assertEquals(case.name, case.maxContext, m.model.maxContext)
            assertEquals(case.name, case.files.toSet(), m.files.keys)
            assertTrue(case.name, b.pteFile.isFile && b.tokenizerFile.isFile)
            assertTrue(case.name, m.tokenizer.file in b.executorchFiles())
        }
    }

    @Test
    fun brokenManifestsAreRefusedNamingTheKey() {
        assertTrue("no mutations in the fixtures", Fixtures.mutations.isNotEmpty())
        for (mutation in Fixtures.mutations) {
            try {
                ManifestParser.parse(mutation.manifest)
                fail("${mutation.name}: accepted")
            } catch (p: BundleProblem) {
                assertTrue("${mutation.name}: '${p.message}' lacks '${mutation.expect}'", p.message.contains(mutation.expect))
                assertTrue(mutation.name, p is BundleProblem.InvalidManifest || p is BundleProblem.UnknownSchemaVersion)
            }
        }
    }

    @Test
    fun unknownSchemaVersionIsRefusedBeforeAnythingElse() {
        for (case in Fixtures.bundles) {
            val text = File(case.dir, Bundle.MANIFEST).readText()
            for (version in listOf<Any>(1, 3, "2", JSONObject.NULL)) {
                val o = JSONObject(text)
                o.put("schema_version", version)
                o.remove("tokenizer")  // would be a second problem: the version is reported first
                try {
                    ManifestParser.parse(o.toString())
                    fail("${case.name}: schema_version $version accepted")
                } catch (p: BundleProblem.UnknownSchemaVersion) {
                    assertTrue(p.message, p.message.contains("this app reads 2"))
                }
            }
        }
    }

    @Test
    fun notJsonIsAnInvalidManifest() {
        try {
            ManifestParser.parse("{\"schema_version\": 2,")
            fail("accepted")
        } catch (p: BundleProblem.InvalidManifest) {
            assertTrue(p.message, p.message.startsWith("manifest.json: manifest.json is not valid JSON"))
        }
    }

    @Test
    fun aDirectoryWithoutManifestIsNotABundle() {
        val d = Fixtures.scratch("empty")
        try {
            Bundle.open(d)
            fail("accepted")
        } catch (p: BundleProblem.NotABundle) {
            assertTrue(p.message, p.message.contains("has no manifest.json"))
        }
    }

    @Test
    fun pathsResolveInsideTheBundleOnly() {
        val b = Bundle.open(Fixtures.bundles[0].dir)
        assertEquals(File(b.dir, b.requireExecutorch().file).canonicalFile, b.pteFile)
        try {
            b.file("../outside.bin")
            fail("escaped the bundle")
        } catch (p: BundleProblem.InvalidManifest) {
            assertTrue(p.message, p.message.contains("resolves outside the bundle"))
        }
    }
}
