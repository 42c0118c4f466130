package org.pocketllm.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.io.RandomAccessFile
import java.util.concurrent.CancellationException

class VerifierTest {
    private val verifier = BundleVerifier(chunkBytes = 4096)  // small chunks: several progress steps per file

    @Test
    fun intactBundleVerifiesWithProgressUpToTheTotal() {
        for (case in Fixtures.bundles) {
            val b = Bundle.open(Fixtures.copyBundle(case))
            val events = ArrayList<VerifyProgress>()
            verifier.verify(b, progress = { events.add(it) })
            val total = b.filesToVerify().fold(0L) { acc, name -> acc + b.manifest.files.getValue(name).size }
            assertTrue(case.name, events.isNotEmpty())
            for (i in 1 until events.size) assertTrue(case.name, events[i].bytesDone >= events[i - 1].bytesDone)
            assertEquals(case.name, total, events.last().bytesDone)
            assertEquals(case.name, total, events.last().bytesTotal)
            assertEquals(case.name, 1f, events.last().fraction, 0f)
            assertEquals(case.name, b.filesToVerify().toSet(), events.map { it.file }.toSet())
        }
    }

    @Test
    fun aFlippedByteIsABadHash() {
        for (case in Fixtures.bundles) {
            val b = Bundle.open(Fixtures.copyBundle(case))
            val pte = b.pteFile
            RandomAccessFile(pte, "rw").use { f ->
                val pos = f.length() / 2
                f.seek(pos)
                val byte = f.read()
                f.seek(pos)
                f.write(byte xor 0x01)
            }
            try {
                verifier.verify(b)
                fail("${case.name}: tampered program accepted")
            } catch (p: BundleProblem.HashMismatch) {
                assertEquals(b.requireExecutorch().file, p.name)
                assertEquals(b.manifest.files.getValue(p.name).sha256, p.expected)
                assertEquals(BundleVerifier.sha256(pte), p.actual)
                assertTrue(p.message, p.message.contains("does not match manifest.json"))
            }
        }
    }

    @Test
    fun aTruncatedFileIsReportedBeforeAnyHashing() {
        for (case in Fixtures.bundles) {
            val b = Bundle.open(Fixtures.copyBundle(case))
            val tok = b.tokenizerFile
            val bytes = tok.readBytes()
            tok.writeBytes(bytes.copyOf(bytes.size - 1))
            val events = ArrayList<VerifyProgress>()
            try {
                verifier.verify(b, progress = { events.add(it) })
                fail("${case.name}: truncated tokenizer accepted")
            } catch (p: BundleProblem.SizeMismatch) {
                assertEquals(b.manifest.tokenizer.file, p.name)
                assertEquals((bytes.size - 1).toLong(), p.actual)
                assertTrue("hashing started before the size check", events.isEmpty())
            }
        }
    }

    @Test
    fun aMissingFileIsReported() {
        for (case in Fixtures.bundles) {
            val b = Bundle.open(Fixtures.copyBundle(case))
            assertTrue(b.tokenizerFile.delete())
            try {
                verifier.verify(b)
                fail("${case.name}: missing tokenizer accepted")
            } catch (p: BundleProblem.MissingFile) {
                assertEquals(b.manifest.tokenizer.file, p.name)
            }
        }
    }

    @Test
    fun unlistedFilesAreIgnored() {
        for (case in Fixtures.bundles) {
            val dir = Fixtures.copyBundle(case)
            File(dir, "notes.txt").writeText("not part of the bundle")
            File(dir, "reference").mkdirs()
            File(dir, "reference/extra.bin").writeBytes(ByteArray(10))
            verifier.verify(Bundle.open(dir))
        }
    }

    @Test
    fun verificationCanBeCancelled() {
        val b = Bundle.open(Fixtures.copyBundle(Fixtures.bundles[0]))
        var calls = 0
        try {
            verifier.verify(b, progress = { calls++ }, isCancelled = { calls > 1 })
            fail("not cancelled")
        } catch (e: CancellationException) {
            assertTrue(calls >= 2)
        }
    }

    @Test
    fun sha256OfKnownVectors() {
        val f = File(Fixtures.scratch("sha"), "abc.txt")
        f.writeText("abc")  // FIPS 180-2 test vector
        assertEquals("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", BundleVerifier.sha256(f))
        f.writeBytes(ByteArray(0))
        assertEquals("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", BundleVerifier.sha256(f))
    }
}
