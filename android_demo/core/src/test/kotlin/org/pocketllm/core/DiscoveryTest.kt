package org.pocketllm.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File

class DiscoveryTest {
    @Test
    fun bundlesAreFoundUnderEachRootAndBrokenOnesExplained() {
        val root = Fixtures.scratch("root")
        for (case in Fixtures.bundles) case.dir.copyRecursively(File(root, case.dir.name))
        File(root, "notes").mkdirs()  // no manifest: not listed
        File(root, ".staging.partial").mkdirs()  // what `pocketllm push` writes before the rename: skipped
        Fixtures.bundles[0].dir.copyRecursively(File(root, ".staging.partial/inner"))
        File(root, ".staging.partial/manifest.json").writeText("{}")
        val broken = File(root, "zz-broken")
        broken.mkdirs()
        File(broken, "manifest.json").writeText("{\"schema_version\": 1}")

        val result = BundleDiscovery.scan(listOf(root, File(root, "does-not-exist")))
        val names = result.entries.map { it.dir.name }
        assertEquals(Fixtures.bundles.map { it.dir.name }.sorted() + "zz-broken", names)
        for (e in result.entries.dropLast(1)) {
            assertNotNull(e.dir.name, e.bundle)
            assertNull(e.problem)
        }
        val last = result.entries.last()
        assertNull(last.bundle)
        assertTrue(last.problem is BundleProblem.UnknownSchemaVersion)
        assertEquals("zz-broken", last.displayName)
        assertTrue(result.unreadableRoots.isEmpty())
    }
}
